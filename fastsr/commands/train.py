"""Train SRGAN in two stages on random crops of the HR images in --data.

Stage 1, pixel-loss pre-training (the default model's recipe):
  fastsr train --data data/train --val data/val --out runs/default --steps 12000 \\
      --lr 4e-4 --loss l1 --amp bf16
Stage 2, adversarial training from the stage-1 generator (VGG19 weights: a local file in
torchvision's format, e.g. vgg19-dcbb9e9d.pth; nothing is downloaded):
  fastsr train --stage gan --init runs/default/checkpoint.pt --vgg-weights vgg19.pth \\
      --data data/train --out runs/gan --steps 20000 --lr 1e-4
Several processes or GPUs (--batch-size is the global batch; only rank 0 writes):
  torchrun --nproc_per_node=4 -m fastsr train --device cuda ...
"""

from __future__ import annotations

import argparse
import os

from ..errors import UserError

HELP = "train SRGAN: pixel-loss pre-training or the GAN stage"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", default="pretrain", choices=["pretrain", "gan"], help="training stage")
    p.add_argument("--data", required=True, help="folder of HR images (searched recursively)")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.csv, model.safetensors")
    p.add_argument("--steps", type=int, default=10000, help="total optimizer steps (default: 10000)")
    p.add_argument("--batch-size", type=int, default=16, help="crops per step (default: 16)")
    p.add_argument("--crop", type=int, default=96, help="HR crop size in pixels (default: 96)")
    p.add_argument("--scale", type=int, default=4, choices=[2, 4, 8], help="upscaling factor (default: 4)")
    p.add_argument("--num-blocks", type=int, default=16, help="residual blocks (default: 16)")
    p.add_argument("--channels", type=int, default=64, help="feature channels (default: 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of Adam (default: 2e-4)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup-steps", type=int, default=200, help="linear warm-up steps (default: 200)")
    p.add_argument("--loss", default="mse", choices=["mse", "l1"], help="pixel loss (default: mse)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the exported weights")
    p.add_argument("--no-permute-channels", action="store_true", help="disable the random RGB permutation")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="mixed precision (default: off)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default: 500)")
    p.add_argument("--val", help="folder of HR images to evaluate (PSNR vs bicubic) at every checkpoint")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--stop-at", type=int, help="save and stop at this step (the schedule still runs to --steps)")
    p.add_argument("--log-every", type=int, default=10, help="CSV/TensorBoard row every N steps (default: 10)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton", "cpp"],
                   help="fused-op backend (default: $FASTSR_BACKEND, else auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (slow start, faster steps)")
    p.add_argument("--no-sync-bn", action="store_true",
                   help="under DDP, keep BatchNorm statistics per rank instead of over the global batch")
    g = p.add_argument_group("gan stage")
    g.add_argument("--init", help="generator weights to start from: a pretrain checkpoint.pt or a model file")
    g.add_argument("--content-loss", default="vgg", choices=["vgg", "mse"],
                   help="VGG19 feature loss (needs --vgg-weights) or pixel MSE (default: vgg)")
    g.add_argument("--vgg-weights", help="torchvision-format VGG19 state dict (.pth or .safetensors)")
    g.add_argument("--content-layer", default="conv5_4",
                   help="VGG19 layer, e.g. conv5_4 (after ReLU, the paper) or conv5_4_prerelu (default: conv5_4)")
    g.add_argument("--content-weight", type=float, default=1.0, help="weight of the content loss (default: 1)")
    g.add_argument("--adv-weight", type=float, default=1e-3, help="weight of the adversarial loss (default: 1e-3)")
    g.add_argument("--pixel-weight", type=float, default=0.0,
                   help="weight of an extra --loss pixel term in the generator loss (default: 0)")
    g.add_argument("--d-lr", type=float, help="discriminator learning rate (default: --lr)")
    g.add_argument("--d-channels", type=int, default=64, help="discriminator base channels (default: 64)")


def run(args: argparse.Namespace) -> int:
    from ..backend import BackendUnavailableError
    from ..train import TrainConfig, TrainingError, train

    cfg = TrainConfig(
        data=args.data, out=args.out, stage=args.stage, steps=args.steps, batch_size=args.batch_size,
        crop=args.crop, scale=args.scale, num_blocks=args.num_blocks, channels=args.channels, lr=args.lr,
        min_lr=args.min_lr, warmup_steps=args.warmup_steps, loss=args.loss, ema_decay=args.ema_decay,
        permute_channels=not args.no_permute_channels, amp=args.amp, save_every=args.save_every,
        val=args.val, seed=args.seed, resume=args.resume, device=args.device, log_every=args.log_every,
        init=args.init, content_loss=args.content_loss, vgg_weights=args.vgg_weights,
        content_layer=args.content_layer, content_weight=args.content_weight, adv_weight=args.adv_weight,
        gan_pixel_weight=args.pixel_weight, d_lr=args.d_lr, d_channels=args.d_channels, workers=args.workers,
        sync_bn=not args.no_sync_bn, compile=args.compile, backend=args.backend, stop_at=args.stop_at,
    )
    try:
        path = train(cfg)
    except (TrainingError, BackendUnavailableError, FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, only rank 0 wrote it
        print(f"exported the EMA generator to {path}")
    return 0

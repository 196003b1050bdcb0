"""Train an SRResNet on random crops of the HR images in --data.

Example (the default model's recipe):
  fastsr train --data data/train --val data/val --out runs/default --steps 12000 \\
      --lr 4e-4 --loss l1 --amp bf16
"""

from __future__ import annotations

import argparse

from ..errors import UserError

HELP = "train an SRResNet (pixel-loss pre-training)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", default="pretrain", choices=["pretrain"], help="training stage (default: pretrain)")
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


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, TrainingError, train

    cfg = TrainConfig(
        data=args.data, out=args.out, stage=args.stage, steps=args.steps, batch_size=args.batch_size,
        crop=args.crop, scale=args.scale, num_blocks=args.num_blocks, channels=args.channels, lr=args.lr,
        min_lr=args.min_lr, warmup_steps=args.warmup_steps, loss=args.loss, ema_decay=args.ema_decay,
        permute_channels=not args.no_permute_channels, amp=args.amp, save_every=args.save_every,
        val=args.val, seed=args.seed, resume=args.resume, device=args.device,
    )
    try:
        path = train(cfg)
    except (TrainingError, FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print(f"exported the EMA generator to {path}")
    return 0

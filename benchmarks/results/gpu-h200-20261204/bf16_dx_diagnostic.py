"""Where the Triton bf16 input gradient's error comes from (run 2 on an H200, docs/gpu-check.md).

For each case, dtype and layout: the Triton gradients (ours), torch's in the same dtype (same) and in
float64 (ref64), against the exact result for the same rounded inputs: float64 arithmetic on the
bf16/fp16 inputs, with the stored pre-activation and the upstream gradient rounded as both do.
Run from the repository root on a GPU: FASTSR_TRITON_AUTOTUNE=0 FASTSR_VALIDATE=0 python <this file>.
"""

import sys

import torch
import torch.nn.functional as F

from fastsr.ops import functional as ops
from fastsr.ops import reference as ref

sys.path.insert(0, "tests")
from cases import conv_inputs  # noqa: E402  (tests/ helpers)
from tolerance import cast, grads  # noqa: E402

# (n, C_in, C_out, H, W, k, shuffle, bias, slope, residual)
CASES = [(1, 3, 64, 7, 13, 9, 1, True, "scalar", False), (1, 64, 256, 7, 13, 3, 2, True, "scalar", False),
         (3, 64, 64, 7, 13, 3, 1, False, "channel", True), (3, 64, 64, 31, 17, 3, 1, True, "channel", True)]


def exact_grads(lo: list, g: torch.Tensor, r: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) in float64 for the rounded inputs ``lo``, z and dz rounded to ``dtype``."""
    x, wt, b, s, _ = (None if t is None else t.double() for t in lo)
    pad = wt.shape[-1] // 2
    z = F.conv2d(x, wt, b, padding=pad)
    zq = (F.pixel_shuffle(z, r) if r > 1 else z).to(dtype).double()
    gl = g.to(dtype).double()
    dzs = torch.where(zq > 0, gl, gl * (s.view(1, -1, 1, 1) if s.numel() > 1 else s)).to(dtype).double()
    dz = F.pixel_unshuffle(dzs, r) if r > 1 else dzs
    return (torch.nn.grad.conv2d_input(x.shape, wt, dz, padding=pad),
            torch.nn.grad.conv2d_weight(x, wt.shape, dz, padding=pad))


def main() -> None:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for case in CASES:
        for dtype in (torch.bfloat16, torch.float16):
            for channels_last in (True, False):
                ins = conv_inputs("cuda", *case, channels_last)
                n, _, c_out, h, w, _, r = case[:7]
                g = torch.randn(n, c_out // r**2, h * r, w * r, dtype=torch.float64, device="cuda",
                                generator=torch.Generator("cuda").manual_seed(1))
                lo = cast(ins, dtype)
                ours = grads(lambda *a: ops.conv2d_prelu(*a, shuffle=r, backend="triton"), lo, g)  # noqa: B023
                same = grads(lambda *a: ref.conv2d_prelu(*a, r), lo, g)  # noqa: B023
                ref64 = grads(lambda *a: ref.conv2d_prelu(*a, r), ins, g)  # noqa: B023
                dx, dw = exact_grads(lo, g, r, dtype)

                def err(a, b):
                    return f"{(a.double() - b).abs().max().item():.3g}"

                print(case[:7], str(dtype)[6:], "cl" if channels_last else "nchw",
                      "| dx ours-exact", err(ours[0], dx), "same-exact", err(same[0], dx),
                      "ours-ref64", err(ours[0], ref64[0]), "same-ref64", err(same[0], ref64[0]),
                      "| dw ours-exact", err(ours[1], dw), "same-exact", err(same[1], dw),
                      "| max|dx|", f"{dx.abs().max().item():.3g}", flush=True)


if __name__ == "__main__":
    main()

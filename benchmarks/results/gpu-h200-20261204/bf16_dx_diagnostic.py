"""Where the Triton bf16 input gradient's error comes from (first H200 run: 2-122 values over the rule)."""
import sys
import torch
import torch.nn.functional as F
sys.path.insert(0, "tests")
from cases import conv_inputs
from tolerance import cast, grads
from fastsr.ops import functional as ops
from fastsr.ops import reference as ref

torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"
CASES = [(1, 3, 64, 7, 13, 9, 1, True, "scalar", False), (1, 64, 256, 7, 13, 3, 2, True, "scalar", False),
         (3, 64, 64, 7, 13, 3, 1, False, "channel", True), (3, 64, 64, 31, 17, 3, 1, True, "channel", True)]
for case in CASES:
    for dtype in (torch.bfloat16, torch.float16):
        for cl in (True, False):
            ins = conv_inputs(dev, *case, cl)
            n, _, c_out, h, w = case[:5]
            r = case[6]
            g = torch.randn(n, c_out // r**2, h * r, w * r, dtype=torch.float64, device=dev,
                            generator=torch.Generator(dev).manual_seed(1))
            lo = cast(ins, dtype)
            ours = grads(lambda *a: ops.conv2d_prelu(*a, shuffle=r, backend="triton"), lo, g)
            same = grads(lambda *a: ref.conv2d_prelu(*a, r), lo, g)
            ref64 = grads(lambda *a: ref.conv2d_prelu(*a, r), ins, g)
            x, wt, b, s, res = [None if t is None else t.double() for t in lo]
            z = F.conv2d(x, wt, b, padding=wt.shape[-1] // 2)
            zs = F.pixel_shuffle(z, r) if r > 1 else z
            zq = zs.to(dtype).double()  # the stored pre-activation
            gl = g.to(dtype).double()
            sl = s.view(1, -1, 1, 1) if s.numel() > 1 else s
            dzs = torch.where(zq > 0, gl, gl * sl).to(dtype).double()
            dz = F.pixel_unshuffle(dzs, r) if r > 1 else dzs
            dx_exact = torch.nn.grad.conv2d_input(x.shape, wt, dz, padding=wt.shape[-1] // 2)
            dw_exact = torch.nn.grad.conv2d_weight(x, wt.shape, dz, padding=wt.shape[-1] // 2)
            e = lambda a, b_: f"{(a.double() - b_).abs().max().item():.3g}"
            print(case[:7], str(dtype)[6:], "cl" if cl else "nchw",
                  "| dx ours-exact", e(ours[0], dx_exact), "same-exact", e(same[0], dx_exact),
                  "ours-ref64", e(ours[0], ref64[0]), "same-ref64", e(same[0], ref64[0]),
                  "| dw ours-exact", e(ours[1], dw_exact), "same-exact", e(same[1], dw_exact),
                  "| max|dx|", f"{dx_exact.abs().max().item():.3g}", flush=True)

"""The fused ops: their interface (:mod:`.functional`), the backend registry and selection
(:mod:`.dispatch`), the torch reference (:mod:`.reference`) and the contract every backend
implements (:mod:`.contract`). The Triton and C++ backends live in ``kernels/`` (``fastsr.kernels``)
and ``csrc/`` (``fastsr.csrc.backend``) and depend on this package's contract, never the other way.
See docs/architecture.md.
"""

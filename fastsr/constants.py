"""Constants shared by the reference, the kernels and the metrics; depends on nothing."""

# ITU-R BT.601 luma as MATLAB's rgb2ycbcr computes it, for RGB in [0, 1] and Y in [0, 1]
# (csrc/common.h has the same numbers for the C++ kernels).
Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
Y_OFFSET = 16.0 / 255.0

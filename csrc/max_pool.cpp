// Kernel schemas of max_pool2d on NCHW planes; the public op is declared in mtlfast/ops/max_pool.py,
// the kernels in csrc/cpu.
//
//   max_pool2d(x, kernel, stride, padding) -> (out, offsets): out[p, oy, ox] the max of the window
//       rows oy * sy - py .. + ky, columns ox * sx - px .. + kx (padding never selected), offsets
//       its position in the window, ky * kw + kx, as uint8 (aten's int64 flat indices take 8x the
//       memory); ties and NaN as aten: the first maximum in row-major order, the last NaN.
//   max_pool2d_backward(grad_out, offsets, input_size, kernel, stride, padding) -> grad_x: each
//       output's gradient added at its window position.
// x, grad_out: contiguous (N, C, H, W) / (N, C, OH, OW), float32 or float64; kernel, stride,
// padding: (rows, columns); padding at most half the kernel, kernel at most 255 positions.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mtlfast_C, m) {
  m.def("max_pool2d(Tensor x, int[2] kernel, int[2] stride, int[2] padding) -> (Tensor, Tensor)");
  m.def(
      "max_pool2d_backward(Tensor grad_out, Tensor offsets, int[2] input_size, int[2] kernel, int[2] stride, "
      "int[2] padding) -> Tensor");
}

// Kernel schemas of winograd_conv3x3 (a 3x3, stride-1, padding-1 convolution by Winograd's
// F(4x4, 3x3) or F(2x2, 3x3)); the public op is declared in mtlfast/ops/winograd_conv.py, the
// kernels in csrc/cpu. The three GEMMs between the transforms are called from Python (oneDNN's or
// torch.mm), one per tile position.
//
// Layout contract: images (N, C, H, W) with any strides; tiles, a list of R * R (Q, C) blocks (one
// per position of the R x R input tile, each dense: stride(0) == C, stride(1) == 1, anywhere in
// memory): 36 for F(4x4, 3x3) (R = 6, output tiles M = 4), 16 for F(2x2, 3x3) (R = 4, M = 2). They
// hold the tiles [first, first + Q) of the P = N * ceil(H / M) * ceil(W / M), tile p = (n, ty, tx)
// row-major; one dtype (float32 or float64).
// Cutting P into ranges keeps each buffer small enough for the allocator to reuse.
//   input:     tiles = B^T d B of every R x R input tile of the range (zero padding of 1)
//   input_t:   grad_x += the adjoint of input applied to tiles (overlapping windows summed); the
//              range is whole rows of tiles; the caller zeroes grad_x before the first range
//   output:    out = A^T m A (+ bias) of every transformed tile of the range, clipped to (H, W)
//   output_t:  tiles = the adjoint of output applied to grad_out, over the range
//   weight:    F(2x2, 3x3) only: tiles (16 blocks of (C_out, C_in)) = G g G^T of every 3x3 kernel
//              of weight (C_out, C_in, 3, 3), any strides
//   weight_t:  its adjoint: grad_weight = G^T u G of the 16 blocks of tiles
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mtlfast_C, m) {
  m.def("winograd_input(Tensor x, int first, Tensor(a!)[] tiles) -> ()");
  m.def("winograd_input_t(Tensor[] tiles, int first, Tensor(a!) grad_x) -> ()");
  m.def("winograd_output(Tensor[] tiles, int first, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("winograd_output_t(Tensor grad_out, int first, Tensor(a!)[] tiles) -> ()");
  m.def("winograd_weight(Tensor weight, Tensor(a!)[] tiles) -> ()");
  m.def("winograd_weight_t(Tensor[] tiles, Tensor(a!) grad_weight) -> ()");
}

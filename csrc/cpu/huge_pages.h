// Fresh tensors for outputs that a kernel writes in full, backed by 2 MiB
// transparent huge pages where Linux offers them on request.
//
// A large allocation is fresh memory from the operating system, and every
// 4 KiB page of it costs a page fault on first touch: the 100 MB output of
// RoIAlign's box-head forward is 25,000 faults, about as long as the pooling
// itself (see benchmarks/results for the measured share). With the common
// "madvise" setting of /sys/kernel/mm/transparent_hugepage/enabled the kernel
// backs a region with huge pages only when asked, which is what this does;
// with "always" it changes nothing and with "never" the advice is ignored.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace maskrcnn_ops {

// Asks for huge pages over the 2 MiB-aligned part of [data, data + bytes).
// Advice only: where it cannot be followed (another OS, THP compiled out,
// a region smaller than a huge page) the memory stays as it is.
void advise_huge_pages(void* data, size_t bytes);

// at::empty, advised before anything touches it.
at::Tensor empty_for_overwrite(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace maskrcnn_ops

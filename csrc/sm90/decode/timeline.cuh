// Per-page event clocks of the decode kernel, for tools/lab/timeline.py (a measuring build only).
//
// Built with -DMLA_TIMELINE (`TORCH_MLA_TIMELINE=1 python setup.py build_ext --inplace`): one
// thread of each role writes clock64() at fixed points of every page into a device buffer, for
// the CTAs of the first kTiles query tiles x kParts stretches. Without the macro every call
// here is empty and the kernel is unchanged. The host resets and reads the buffer through three
// extern "C" functions of the extension (decode.cu), so no op or schema knows about it.
#pragma once

namespace mla::sm90::timeline {

constexpr int kParts = 8, kTiles = 4, kRows = 256, kEvents = 8;  // row 0: header; row g + 1: page g

// Header (row 0) events.
enum Header { kStartClock, kStartNs, kEndClock, kEndNs, kPagesDone, kSmId, kFirstLoadsIssued };
// Page events (row g + 1), in the order they happen in one page's life.
enum Page {
  kScoreWaitFull,   // WG0 starts waiting for the page to land
  kScoreIssue,      // WG0: page landed, S = Q K^T issued
  kScoreDone,       // WG0: S in registers
  kPReady,          // WG0: softmax done, P and row factors written, p_full arrived
  kValueIssue,      // WG1: p_full seen, P.V issued
  kValueDone,       // WG1: P.V done
  kRefillIssued,    // WG1's producer: both value warpgroups done, the last part of this stage's refill issued
  kValue2Done,      // WG2: P.V done
};

#ifdef MLA_TIMELINE
__device__ long long buffer[kParts * kTiles * kRows * kEvents];

__device__ __forceinline__ long long now_ns() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ long long* at(int row, int event) {
  if (blockIdx.y >= kParts || blockIdx.x >= kTiles || row >= kRows) return nullptr;
  return buffer + ((static_cast<int>(blockIdx.y) * kTiles + blockIdx.x) * kRows + row) * kEvents + event;
}
__device__ __forceinline__ void page(int g, Page e) {
  if (long long* p = at(g + 1, e)) *p = clock64();
}
__device__ __forceinline__ void header(Header e, long long value) {
  if (long long* p = at(0, e)) *p = value;
}
__device__ __forceinline__ void loads_issued() { header(kFirstLoadsIssued, clock64()); }
__device__ __forceinline__ void start() {
  header(kStartClock, clock64());
  header(kStartNs, now_ns());
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  header(kSmId, sm);
}
__device__ __forceinline__ void end(int pages) {
  header(kEndClock, clock64());
  header(kEndNs, now_ns());
  header(kPagesDone, pages);
}
#else
__device__ __forceinline__ void page(int, Page) {}
__device__ __forceinline__ void loads_issued() {}
__device__ __forceinline__ void start() {}
__device__ __forceinline__ void end(int) {}
#endif

}  // namespace mla::sm90::timeline

"""Peak memory of one call: CUDA's allocator statistics, or on the CPU the growth of the
resident set's high-water mark (with glibc's malloc set up so that frees go back to the
OS)."""
import ctypes

import torch


_MALLOC_FIXED = False


def fix_malloc_for_rss():
    """Large frees go back to the OS from here on (glibc mmap threshold fixed at
    64 KiB), so resident memory follows live tensors. Returns False off glibc."""
    global _MALLOC_FIXED
    if not _MALLOC_FIXED:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _MALLOC_FIXED = bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 64 * 1024))
        except OSError:
            _MALLOC_FIXED = False
    return _MALLOC_FIXED


def _proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory(fn, device):
    """Peak extra memory of one call of fn, in bytes. CUDA: max_memory_allocated
    over what was allocated before. CPU: growth of the resident set's high-water
    mark (VmHWM, reset through /proc/self/clear_refs) over VmRSS before the
    call; this counts everything, BLAS and oneDNN buffers included, and
    fused_lstm's reused buffers, which are released before the call."""
    fn()  # warm: one-time initialisation is not part of the peak
    if device == "cpu":
        torch.ops.fused_lstm.release_cpu_scratch()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not fix_malloc_for_rss():
        return None
    try:
        # Free heap pages back to the OS first: a large allocation is served from a
        # free chunk of the heap when one fits (left by many small frees, e.g. nn.LSTM's
        # or the agreement check's), and then adds nothing to the resident set.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _proc_status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return _proc_status("VmHWM:") - base
    except OSError:
        return None

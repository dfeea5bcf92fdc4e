//! How the process's allocator treats tensor-sized blocks.

/// Makes glibc's malloc keep the memory of freed blocks for the next allocation, instead of
/// mapping each large block afresh and unmapping it when it is freed. Call it first thing in
/// `main`, before any thread starts.
///
/// Why: a transformer step allocates and frees dozens of activations of 10-250 MB. glibc
/// serves blocks above its mmap threshold (at most 32 MB) from fresh mappings, and the kernel
/// zeroes every page of a fresh mapping when it is first touched: 11% of a 512x512 FLUX.1
/// transformer call on the CPU went to page faults and page clearing. With one arena (threads
/// other than the main one otherwise get arenas that map large blocks regardless), no
/// mappings and no trimming below 2 GB, the next activation of the same size reuses pages
/// that are already resident. The cost: the process keeps its high-water mark of memory
/// between generations, which an inference server reaches again at the next one anyway.
/// Other C libraries keep their own behaviour.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters; it is called before other
    // threads exist, and each value is within the range glibc documents for its parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

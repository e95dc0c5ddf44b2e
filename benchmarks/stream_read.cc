// How fast this machine streams memory into T threads: the ceiling of a memory-bound decode step
// (RESULTS.md, issue 6). Reads 512 MiB (2 MiB pages where the kernel gives them) 15 times; prints
// the median and best GB/s.
//   g++ -O2 -mavx512f -pthread benchmarks/stream_read.cc -o /tmp/stream_read && /tmp/stream_read 2
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

int main(int argc, char **argv) {
    const size_t bytes = 512ul << 20;
    const int threads = argc > 1 ? std::max(1, atoi(argv[1])) : 2;
    char *p = (char *)mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 1;
    madvise(p, bytes, MADV_HUGEPAGE);
    memset(p, 1, bytes);
    std::vector<double> rates;
    std::vector<float> sink(threads);
    for (int rep = 0; rep < 15; rep++) {
        const auto t0 = std::chrono::steady_clock::now();
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; t++)
            pool.emplace_back([&, t] {
                __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;  // four chains: loads, not adds, limit
                for (size_t i = bytes / threads * t; i < bytes / threads * (t + 1); i += 256) {
                    s0 = _mm512_add_ps(s0, _mm512_load_ps((const float *)(p + i)));
                    s1 = _mm512_add_ps(s1, _mm512_load_ps((const float *)(p + i + 64)));
                    s2 = _mm512_add_ps(s2, _mm512_load_ps((const float *)(p + i + 128)));
                    s3 = _mm512_add_ps(s3, _mm512_load_ps((const float *)(p + i + 192)));
                }
                sink[t] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
            });
        for (auto &t : pool) t.join();
        rates.push_back(bytes / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9);
    }
    std::sort(rates.begin(), rates.end());
    printf("%d threads: %.1f GB/s median, %.1f best (of 15 reads of 512 MiB; checksum %g)\n", threads,
           rates[rates.size() / 2], rates.back(), (double)sink[0]);
}

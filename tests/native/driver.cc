// Test driver for the native CPU engine (edgemamba/kernels/cpu/emcpu.h), built with emcpu.cc for
// x86 and cross-compiled for aarch64 (run under qemu-user) by tests/test_native.py.
//
//   driver CASE OUT    reads a test case written by tests/test_native.py::write_case, runs its ops
//                      through em_create / em_prefill / em_step, writes each op's logits and the
//                      state after it to OUT (raw float32), and prints "isa=<em_isa()>".
//
// CASE (little-endian):
//   "EMCASE1\n"; int32 config[12] (emcpu.h's em_config ints, in order); float32 config[4] (norm_eps,
//   dt_min, dt_max, bcdt_eps); int32 n_threads, max_rows, batch;
//   int32 n_tensors, each: int32 name_len, name, int32 fmt, k, n, block, int64 n_bytes, bytes,
//     int64 n_scales, float32 scales[n_scales]   (fmt 0: a float32 vector of n_bytes/4 values)
//   int32 n_ops, each: int32 kind (1: prefill of sequence `arg`, 2: step of sequences [0, arg)),
//     int32 arg, int32 count, int64 ids[count]
// OUT, per op: float32 logits, (vocab) for a prefill, (arg, vocab) for a step; then per layer the
//   conv state (batch, conv_dim, d_conv-1) and the ssm state (batch, d_inner, d_state).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "emcpu.h"

namespace {
FILE *in_file;

[[noreturn]] void die(const std::string &why) {
    std::fprintf(stderr, "driver: %s\n", why.c_str());
    std::exit(2);
}

void read_bytes(void *p, size_t n) {
    if (n && std::fread(p, 1, n, in_file) != n) die("truncated case file");
}
template <class T>
T read() {
    T v;
    read_bytes(&v, sizeof v);
    return v;
}

struct Tensor {
    int32_t fmt = 0, k = 0, n = 0, block = 0;
    std::vector<float> data;  // float-aligned storage for any format
    std::vector<float> scales;
    em_weight weight() const {
        em_weight w{};  // fields not set here stay 0: their defaults
        w.data = data.data(), w.scales = scales.empty() ? nullptr : scales.data();
        w.fmt = fmt, w.k = k, w.n = n, w.block = block;
        return w;
    }
};
}  // namespace

int main(int argc, char **argv) {
    if (argc != 3) die("usage: driver CASE OUT");
    in_file = std::fopen(argv[1], "rb");
    if (!in_file) die(std::string("cannot open ") + argv[1]);
    char magic[8];
    read_bytes(magic, 8);
    if (std::memcmp(magic, "EMCASE1\n", 8)) die("not a case file");

    em_config c{};
    int32_t *ints[] = {&c.arch, &c.d_model, &c.n_layer, &c.vocab, &c.d_inner, &c.d_state, &c.d_conv, &c.dt_rank,
                       &c.n_heads, &c.head_dim, &c.n_groups, &c.norm_before_gate};
    for (int32_t *p : ints) *p = read<int32_t>();
    for (float *p : {&c.norm_eps, &c.dt_min, &c.dt_max, &c.bcdt_eps}) *p = read<float>();
    const int n_threads = read<int32_t>(), max_rows = read<int32_t>(), batch = read<int32_t>();

    std::map<std::string, Tensor> t;
    for (int i = read<int32_t>(); i > 0; i--) {
        std::string name(read<int32_t>(), '\0');
        read_bytes(&name[0], name.size());
        Tensor &x = t[name];
        x.fmt = read<int32_t>(), x.k = read<int32_t>(), x.n = read<int32_t>(), x.block = read<int32_t>();
        const int64_t nbytes = read<int64_t>();
        x.data.resize((nbytes + 3) / 4);
        read_bytes(x.data.data(), nbytes);
        x.scales.resize(read<int64_t>());
        read_bytes(x.scales.data(), x.scales.size() * 4);
    }
    auto vec = [&](const std::string &name) -> const float * {
        auto it = t.find(name);
        if (it == t.end()) return nullptr;
        if (it->second.fmt != EM_NONE) die(name + " is not a vector");
        return it->second.data.data();
    };
    auto mat = [&](const std::string &name) -> em_weight {
        auto it = t.find(name);
        return it == t.end() ? em_weight{} : it->second.weight();
    };

    std::vector<em_layer> layers(c.n_layer);
    for (int i = 0; i < c.n_layer; i++) {
        const std::string p = "layers." + std::to_string(i) + ".";
        em_layer &L = layers[i];
        L.norm = vec(p + "norm"), L.conv_w = vec(p + "conv_weight"), L.conv_b = vec(p + "conv_bias");
        L.in_proj_b = vec(p + "in_proj_bias"), L.out_proj_b = vec(p + "out_proj_bias"), L.dt_bias = vec(p + "dt_bias");
        L.A = vec(p + "A"), L.D = vec(p + "D"), L.gate_norm = vec(p + "gate_norm");
        L.in_proj = mat(p + "in_proj"), L.x_proj = mat(p + "x_proj"), L.dt_proj = mat(p + "dt_proj");
        L.out_proj = mat(p + "out_proj");
    }
    const em_weight emb = mat("embedding"), head = mat("lm_head");
    char err[512] = "";
    em_model *m = em_create(&c, &emb, &head, vec("norm_f"), layers.data(), n_threads, max_rows, err, sizeof err);
    if (!m) die(std::string("em_create: ") + err);

    const int conv_dim = c.arch == 1 ? c.d_inner : c.d_inner + 2 * c.n_groups * c.d_state;
    const size_t conv_size = (size_t)conv_dim * (c.d_conv - 1), ssm_size = (size_t)c.d_inner * c.d_state;
    std::vector<std::vector<float>> conv(c.n_layer, std::vector<float>(batch * conv_size)),
        ssm(c.n_layer, std::vector<float>(batch * ssm_size));
    std::vector<float *> cp(c.n_layer), sp(c.n_layer);

    FILE *out = std::fopen(argv[2], "wb");
    if (!out) die(std::string("cannot write ") + argv[2]);
    for (int i = read<int32_t>(); i > 0; i--) {
        const int kind = read<int32_t>(), arg = read<int32_t>(), count = read<int32_t>();
        std::vector<int64_t> ids(count);
        read_bytes(ids.data(), ids.size() * 8);
        std::vector<float> logits;
        if (kind == 1) {
            if (arg < 0 || arg >= batch || count < 1) die("bad prefill op");
            for (int l = 0; l < c.n_layer; l++)
                cp[l] = conv[l].data() + arg * conv_size, sp[l] = ssm[l].data() + arg * ssm_size;
            logits.resize(c.vocab);
            em_prefill(m, ids.data(), count, cp.data(), sp.data(), logits.data());
        } else if (kind == 2) {
            if (arg < 1 || arg > batch || count != arg) die("bad step op");
            for (int l = 0; l < c.n_layer; l++) cp[l] = conv[l].data(), sp[l] = ssm[l].data();
            logits.resize((size_t)arg * c.vocab);
            em_step(m, ids.data(), arg, cp.data(), sp.data(), logits.data());
        } else {
            die("unknown op");
        }
        std::fwrite(logits.data(), 4, logits.size(), out);
        for (int l = 0; l < c.n_layer; l++) {
            std::fwrite(conv[l].data(), 4, conv[l].size(), out);
            std::fwrite(ssm[l].data(), 4, ssm[l].size(), out);
        }
    }
    if (std::fclose(out)) die("write failed");
    em_destroy(m);
    std::printf("isa=%s\n", em_isa());
    return 0;
}

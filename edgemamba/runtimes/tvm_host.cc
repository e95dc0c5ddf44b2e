// tvm_host: run an edgemamba tvm-llvm / tvm-aarch64 artifact with TVM's runtime alone, no Python.
//
//   tvm_host ARTIFACT PLAN OUT
//
// ARTIFACT is the artifact directory (manifest.json, model.so, weights.bin). PLAN is a text file of
// lines "prefill ID ID ..." or "step ID" run in order on one sequence whose state starts at zero;
// the logits after each line (vocab float32 values) are appended to OUT.
//
// It links libtvm_ffi.so and libtvm_runtime.so and nothing else of TVM: the deployment the
// tvm-aarch64 target is tested with under qemu (tests/test_tvm.py), and a template for an app.
// Build (cross): aarch64-linux-gnu-g++ -std=c++17 -O2 tvm_host.cc -I<tvm_ffi include> -L<runtime>
//                -ltvm_runtime -ltvm_ffi -o tvm_host

#include <sys/mman.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

namespace ffi = tvm::ffi;

namespace {

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "tvm_host: %s\n", what.c_str());
  std::exit(2);
}

// Tensors over memory we own (zeroed, 64-byte aligned as TVM's kernels assume) ...
struct OwnedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n ? n : 64);
    std::memset(t->data, 0, n);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// ... or over a memory-mapped weights file that outlives them.
struct MappedAlloc {
  char* base;
  size_t offset;
  void AllocData(DLTensor* t) { t->data = base + offset; }
  void FreeData(DLTensor*) {}
};

DLDataType DType(const std::string& name) {
  if (name == "float32") return DLDataType{kDLFloat, 32, 1};
  if (name == "float16") return DLDataType{kDLFloat, 16, 1};
  if (name == "int32") return DLDataType{kDLInt, 32, 1};
  if (name == "int8") return DLDataType{kDLInt, 8, 1};
  if (name == "uint8") return DLDataType{kDLUInt, 8, 1};
  Fail("unsupported dtype " + name);
}

std::vector<int64_t> Shape(const ffi::Array<ffi::Any>& dims, size_t skip = 0) {
  std::vector<int64_t> out;
  for (size_t i = skip; i < dims.size(); ++i) out.push_back(dims[i].cast<int64_t>());
  return out;
}

ffi::Tensor Empty(std::vector<int64_t> shape, DLDataType dtype) {
  return ffi::Tensor::FromNDAlloc(OwnedAlloc(), ffi::Shape(shape), dtype, DLDevice{kDLCPU, 0});
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail(path + ": cannot read");
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) Fail("usage: tvm_host ARTIFACT PLAN OUT");
  std::string dir = argv[1];
  ffi::String error;
  ffi::Map<ffi::String, ffi::Any> manifest =
      ffi::json::Parse(ReadFile(dir + "/manifest.json"), &error).cast<ffi::Map<ffi::String, ffi::Any>>();
  auto tvm = manifest["tvm"].cast<ffi::Map<ffi::String, ffi::Any>>();
  int64_t vocab = manifest["spec"].cast<ffi::Map<ffi::String, ffi::Any>>()["vocab_size"].cast<int64_t>();

  // the library, its Relax VM on the CPU (pooled allocator)
  ffi::Module lib = ffi::Module::LoadFromFile(dir + "/" + std::string(tvm["library"].cast<ffi::String>()));
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2, static_cast<int>(kDLCPU), 0, 2);

  // weights: views of weights.bin in the library's parameter order
  std::string wpath = dir + "/weights.bin";
  int fd = open(wpath.c_str(), O_RDONLY);
  struct stat st;
  if (fd < 0 || fstat(fd, &st) != 0) Fail(wpath + ": cannot open");
  char* base = static_cast<char*>(mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0));
  if (base == MAP_FAILED) Fail(wpath + ": cannot map");
  std::vector<ffi::Tensor> weights;
  for (const ffi::Any& p : tvm["params"].cast<ffi::Array<ffi::Any>>()) {
    auto e = p.cast<ffi::Map<ffi::String, ffi::Any>>();
    MappedAlloc at{base, static_cast<size_t>(e["offset"].cast<int64_t>())};
    weights.push_back(ffi::Tensor::FromNDAlloc(at, ffi::Shape(Shape(e["shape"].cast<ffi::Array<ffi::Any>>())),
                                               DType(e["dtype"].cast<ffi::String>()), DLDevice{kDLCPU, 0}));
  }
  // the state of one sequence, zeros, in manifest order (conv_state.0, ssm_state.0, ...)
  std::vector<ffi::Tensor> state;
  for (const ffi::Any& s : manifest["state"].cast<ffi::Array<ffi::Any>>()) {
    auto e = s.cast<ffi::Map<ffi::String, ffi::Any>>();
    std::vector<int64_t> shape = Shape(e["shape"].cast<ffi::Array<ffi::Any>>(), 1);
    shape.insert(shape.begin(), 1);
    state.push_back(Empty(shape, DLDataType{kDLFloat, 32, 1}));
  }
  ffi::Tensor logits = Empty({1, vocab}, DLDataType{kDLFloat, 32, 1});

  std::ifstream plan(argv[2]);
  std::FILE* out = std::fopen(argv[3], "wb");
  if (!plan || !out) Fail("cannot open the plan or the output file");
  std::string line;
  while (std::getline(plan, line)) {
    std::istringstream words(line);
    std::string kind;
    if (!(words >> kind)) continue;
    std::vector<int32_t> ids;
    for (int32_t id; words >> id;) ids.push_back(id);
    if (ids.empty() || (kind != "prefill" && kind != "step") || (kind == "step" && ids.size() != 1)) {
      Fail("bad plan line: " + line);
    }
    ffi::Tensor ids_t = Empty({static_cast<int64_t>(ids.size())}, DLDataType{kDLInt, 32, 1});
    std::memcpy(ids_t.data_ptr(), ids.data(), ids.size() * sizeof(int32_t));
    // prefill(ids, logits, state..., weights...) and step_1(...) write logits and state in place
    std::vector<ffi::AnyView> args{ids_t, logits};
    for (auto& t : state) args.push_back(t);
    for (auto& t : weights) args.push_back(t);
    ffi::Any result;
    vm->GetFunction(kind == "prefill" ? "prefill" : "step_1").value().CallPacked(args.data(), args.size(), &result);
    std::fwrite(logits.data_ptr(), sizeof(float), vocab, out);
  }
  std::fclose(out);
  return 0;
}

// mnn_fast_predict: runs an mnn_fast AOTInductor package (`mnn-fast export`) on one batch and prints
// each row's predicted class and log-probabilities. No Python: the package's own code plus the
// mnn_fast op library (its routing kernels), loaded before the package.
//
// usage: mnn_fast_predict MODEL.pt2 [--ops LIBRARY] [--batch N] [--input FILE]
//   --ops    the mnn_fast op library (default: the libmnn_fast_ops this CMake project built)
//   --batch  rows to run (default 4; 1 to the package's max batch)
//   --input  raw little-endian float32 values, batch x input shape of them. Default: the ramp
//            x.flatten()[i] = (i % 17) / 16 - 0.5, exact in float32, so any program can rebuild it.
// Prints "package: ..." then one line per row: "row I: class C log-probs V0 V1 ...", the values as
// hex floats (printf %a), which read back exactly.
#include <ATen/ops/empty.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string package;
  std::string ops = MNN_FAST_OPS_LIBRARY;
  long batch = 4;
  std::string input;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--ops") o.ops = value();
    else if (arg == "--batch") o.batch = std::stol(value());
    else if (arg == "--input") o.input = value();
    else if (!arg.empty() && arg[0] == '-') throw std::invalid_argument("unknown option " + arg);
    else if (o.package.empty()) o.package = arg;
    else throw std::invalid_argument("one package expected, got a second: " + arg);
  }
  if (o.package.empty()) throw std::invalid_argument("usage: mnn_fast_predict MODEL.pt2 [--ops LIB] [--batch N] [--input FILE]");
  return o;
}

// The record `mnn-fast export` embeds (mnn_fast.* keys); a package without it is not mnn_fast's.
std::string field(const std::unordered_map<std::string, std::string>& meta, const std::string& key) {
  auto it = meta.find(key);
  if (it == meta.end()) throw std::invalid_argument("not an mnn_fast package (no " + key + " in its metadata)");
  return it->second;
}

std::vector<int64_t> ints(const std::string& text) {  // "1,8,8" -> {1, 8, 8}
  std::vector<int64_t> out;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');) out.push_back(std::stoll(part));
  return out;
}

int run(const Options& o) {
  auto meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(o.package, "model");
  std::vector<int64_t> shape = ints(field(meta, "mnn_fast.input_shape"));
  const long max_batch = std::stol(field(meta, "mnn_fast.max_batch"));
  if (o.batch < 1 || o.batch > max_batch)
    throw std::invalid_argument("--batch must be in 1.." + std::to_string(max_batch) + ", got " + std::to_string(o.batch));

  // The package calls mnn_fast::route and its siblings through the dispatcher: they must be
  // registered (by loading the library) before the package is. Lazily: the Python extension's
  // module-init function names libpython, and is never called here.
  if (!dlopen(o.ops.c_str(), RTLD_LAZY | RTLD_GLOBAL))
    throw std::runtime_error(std::string("cannot load the mnn_fast op library: ") + dlerror());
  torch::inductor::AOTIModelPackageLoader loader(o.package);

  shape.insert(shape.begin(), o.batch);
  at::Tensor x = at::empty(shape, at::kFloat);
  float* data = x.data_ptr<float>();
  const int64_t n = x.numel();
  if (o.input.empty()) {
    for (int64_t i = 0; i < n; ++i) data[i] = static_cast<float>(i % 17) / 16.0f - 0.5f;
  } else {
    std::ifstream file(o.input, std::ios::binary);
    if (!file.read(reinterpret_cast<char*>(data), n * static_cast<std::streamsize>(sizeof(float))))
      throw std::invalid_argument(o.input + ": expected " + std::to_string(n) + " float32 values");
  }

  at::Tensor out = loader.run({x})[0].contiguous();  // Tensor[B, C] float32 log-probabilities
  std::printf("package: mnn_fast %s, %s classes, input shape %s, max batch %ld, run %s\n",
              field(meta, "mnn_fast.version").c_str(), field(meta, "mnn_fast.num_classes").c_str(),
              field(meta, "mnn_fast.input_shape").c_str(), max_batch, field(meta, "mnn_fast.run_fingerprint").c_str());
  const int64_t classes = out.size(1);
  const float* logp = out.data_ptr<float>();
  for (int64_t r = 0; r < out.size(0); ++r) {
    int64_t best = 0;
    for (int64_t c = 1; c < classes; ++c)
      if (logp[r * classes + c] > logp[r * classes + best]) best = c;  // first maximum, as argmax
    std::printf("row %ld: class %ld log-probs", static_cast<long>(r), static_cast<long>(best));
    for (int64_t c = 0; c < classes; ++c) std::printf(" %a", static_cast<double>(logp[r * classes + c]));
    std::printf("\n");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::string message = e.what();
    std::fprintf(stderr, "mnn_fast_predict: error: %s\n", message.substr(0, message.find('\n')).c_str());
    return 2;
  }
}

// cuBLASLt for qmatmul. Per device: one handle. Per GEMM spec (shape, types,
// scale modes, epilogue): one plan, i.e. the matmul descriptor, the four
// matrix layouts and the heuristic's first algorithm, built on first use and
// kept for the life of the process. A call then only looks its plan up and
// sets the per-call pointers (scales, bias, D scale, amax) before
// cublasLtMatmul: no descriptor is created, no heuristic is asked, nothing
// allocates. The algorithm is a function of the spec alone, so the bits of a
// result are too (an earlier version timed the top candidates and let timing
// noise pick among them without ever finding a faster one).
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "cublaslt_gemm.h"
#include "qmatmul.h"

namespace jax_bq::cuda {
namespace {

constexpr int kMaxDevices = 64;

struct Handles {
  std::mutex mu;
  std::array<cublasLtHandle_t, kMaxDevices> h{};
};
Handles& HandleTable() {
  static Handles* t = new Handles();  // never destroyed: handlers may outlive statics
  return *t;
}

cublasStatus_t GetHandle(int device, cublasLtHandle_t* out) {
  if (device < 0 || device >= kMaxDevices) return CUBLAS_STATUS_INVALID_VALUE;
  Handles& t = HandleTable();
  std::lock_guard<std::mutex> lock(t.mu);
  if (t.h[device] == nullptr) {
    const cublasStatus_t s = cublasLtCreate(&t.h[device]);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
  }
  *out = t.h[device];
  return CUBLAS_STATUS_SUCCESS;
}

std::string CublasError(const char* what, cublasStatus_t s) {
  return std::string("jax_bq: cuBLASLt ") + what + " failed: " + cublasLtGetStatusString(s);
}

#define JAX_BQ_CUBLAS(what, expr)                                          \
  do {                                                                     \
    const cublasStatus_t _s = (expr);                                      \
    if (_s != CUBLAS_STATUS_SUCCESS) return Status(CublasError(what, _s)); \
  } while (0)

// Everything about one GEMM spec that does not change between calls.
struct GemmPlan {
  std::mutex mu;  // the descriptor's pointer attributes are set per call
  cublasLtHandle_t handle = nullptr;
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~GemmPlan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

template <typename T>
cublasStatus_t SetAttr(cublasLtMatmulDesc_t op, cublasLtMatmulDescAttributes_t attr,
                       const T& value) {
  return cublasLtMatmulDescSetAttribute(op, attr, &value, sizeof(value));
}

cublasLtEpilogue_t CublasEpilogue(int32_t bits) {
  const bool bias = bits & kEpiBias, gelu = bits & kEpiGelu;
  if (gelu) return bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
  return bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
}

// Sets the per-call pointers; at plan time with placeholders, so that the
// heuristic sees which features (bias, D scale, amax) the calls will use.
Status SetPointers(const GemmSpec& g, cublasLtMatmulDesc_t op, const GemmPointers& p) {
  JAX_BQ_CUBLAS("set A_SCALE_POINTER",
                SetAttr(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, p.a_scale));
  JAX_BQ_CUBLAS("set B_SCALE_POINTER",
                SetAttr(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, p.b_scale));
  if (g.epilogue & kEpiBias) {
    JAX_BQ_CUBLAS("set BIAS_POINTER", SetAttr(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, p.bias));
  }
  if (IsFp8Type(g.d_type)) {
    JAX_BQ_CUBLAS("set D_SCALE_POINTER",
                  SetAttr(op, CUBLASLT_MATMUL_DESC_D_SCALE_POINTER, p.d_scale));
  }
  if (g.epilogue & kEpiAmax) {
    JAX_BQ_CUBLAS("set AMAX_D_POINTER", SetAttr(op, CUBLASLT_MATMUL_DESC_AMAX_D_POINTER, p.amax));
  }
  return Status();
}

Status BuildPlan(const GemmSpec& g, GemmPlan* plan) {
  JAX_BQ_CUBLAS("Create", GetHandle(g.device, &plan->handle));
  JAX_BQ_CUBLAS("MatmulDescCreate",
                cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasLtMatmulDesc_t op = plan->op;
  JAX_BQ_CUBLAS("set TRANSA", SetAttr(op, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T));
  JAX_BQ_CUBLAS("set TRANSB", SetAttr(op, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N));
  JAX_BQ_CUBLAS("set A_SCALE_MODE", SetAttr(op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, g.a_mode));
  JAX_BQ_CUBLAS("set B_SCALE_MODE", SetAttr(op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, g.b_mode));
  if (g.device_alpha) {
    JAX_BQ_CUBLAS("set POINTER_MODE",
                  SetAttr(op, CUBLASLT_MATMUL_DESC_POINTER_MODE, CUBLASLT_POINTER_MODE_DEVICE));
  }
  JAX_BQ_CUBLAS("set EPILOGUE",
                SetAttr(op, CUBLASLT_MATMUL_DESC_EPILOGUE, CublasEpilogue(g.epilogue)));
  if (g.epilogue & kEpiBias) {
    JAX_BQ_CUBLAS("set BIAS_DATA_TYPE", SetAttr(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                                static_cast<int32_t>(g.bias_type)));
  }
  static const float kPlaceholder[4] = {};
  void* ph = const_cast<float*>(kPlaceholder);
  GemmPointers p;
  p.a_scale = p.b_scale = p.bias = p.d_scale = kPlaceholder;
  p.amax = static_cast<float*>(ph);
  Status st = SetPointers(g, op, p);
  if (!st.ok()) return st;
  JAX_BQ_CUBLAS("layout A", cublasLtMatrixLayoutCreate(&plan->a, g.a_type, g.k, g.n, g.k));
  JAX_BQ_CUBLAS("layout B", cublasLtMatrixLayoutCreate(&plan->b, g.b_type, g.k, g.m, g.k));
  JAX_BQ_CUBLAS("layout C", cublasLtMatrixLayoutCreate(&plan->c, g.c_type, g.n, g.m, g.n));
  JAX_BQ_CUBLAS("layout D", cublasLtMatrixLayoutCreate(&plan->d, g.d_type, g.n, g.m, g.n));

  cublasLtMatmulPreference_t pref = nullptr;
  JAX_BQ_CUBLAS("PreferenceCreate", cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kCublasWorkspaceBytes;
  cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulAlgoGetHeuristic(plan->handle, op, plan->a, plan->b, plan->c, plan->d, pref,
                                       1, &res, &found);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  if (s != CUBLAS_STATUS_SUCCESS) return Status(CublasError("AlgoGetHeuristic", s));
  if (found == 0) return Status("jax_bq: cuBLASLt has no algorithm for this GEMM");
  plan->algo = res.algo;
  return Status();
}

struct PlanCache {
  std::mutex mu;
  std::map<decltype(GemmSpec{}.Key()), std::unique_ptr<GemmPlan>> plans;
};
PlanCache& Plans() {
  static PlanCache* c = new PlanCache();  // never destroyed, like the handles
  return *c;
}

// The cached plan of g, built on first use (a failed build is not cached).
Status GetPlan(const GemmSpec& g, GemmPlan** out) {
  PlanCache& c = Plans();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.plans.find(g.Key());
  if (it != c.plans.end()) {
    *out = it->second.get();
    return Status();
  }
  auto plan = std::make_unique<GemmPlan>();
  Status st = BuildPlan(g, plan.get());
  if (!st.ok()) return st;
  *out = plan.get();
  c.plans.emplace(g.Key(), std::move(plan));
  return Status();
}

void DebugLine(const GemmSpec& g, const GemmPlan& plan, const GemmPointers& p) {
  int id = -1, tile = -1, splitk = -1, red = -1;
  size_t w = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&plan.algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof(id), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&plan.algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile,
                                       sizeof(tile), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&plan.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk,
                                       sizeof(splitk), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&plan.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red,
                                       sizeof(red), &w);
  auto mod = [](const void* q) { return static_cast<int>(reinterpret_cast<uintptr_t>(q) % 256); };
  std::fprintf(stderr,
               "jax_bq gemm m=%lld n=%lld k=%lld modes=%d,%d epilogue=%d algo=%d tile=%d "
               "splitk=%d red=%d align%%256 a=%d b=%d out=%d\n",
               static_cast<long long>(g.m), static_cast<long long>(g.n),
               static_cast<long long>(g.k), g.a_mode, g.b_mode, g.epilogue, id, tile, splitk, red,
               mod(p.a), mod(p.b), mod(p.d));
}

}  // namespace

bool IsFp8Type(cudaDataType_t t) { return t == CUDA_R_8F_E4M3 || t == CUDA_R_8F_E5M2; }

Status RunGemm(cudaStream_t stream, const GemmSpec& g, const GemmPointers& p) {
  GemmPlan* plan = nullptr;
  Status st = GetPlan(g, &plan);
  if (!st.ok()) return st;
  // JAX_BQ_DEBUG_GEMM=1: one stderr line per call with the algorithm.
  static const bool debug = std::getenv("JAX_BQ_DEBUG_GEMM") != nullptr;
  if (debug) DebugLine(g, *plan, p);
  const float one = 1.0f, zero = 0.0f;
  const bool residual = g.epilogue & kEpiResidual;
  const void* alpha = g.device_alpha ? static_cast<const void*>(p.alpha_beta) : &one;
  const void* beta =
      g.device_alpha ? static_cast<const void*>(p.alpha_beta + 1) : (residual ? &one : &zero);
  // beta = 0: C is not read, but cuBLASLt takes C == D as in-place and then
  // wants their layouts equal, which an FP8 D with a bf16 C layout is not; so
  // C points at the (unread) workspace instead.
  const void* c = residual ? p.residual : (IsFp8Type(g.d_type) ? p.workspace : p.d);
  std::lock_guard<std::mutex> lock(plan->mu);
  st = SetPointers(g, plan->op, p);
  if (!st.ok()) return st;
  JAX_BQ_CUBLAS("Matmul", cublasLtMatmul(plan->handle, plan->op, alpha, p.a, plan->a, p.b, plan->b,
                                         beta, c, plan->c, p.d, plan->d, &plan->algo, p.workspace,
                                         kCublasWorkspaceBytes, stream));
  return LastCudaError("cublasLtMatmul");
}

std::string CublasLtProbe(int device, int64_t m, int64_t n, int64_t k, int a_type, int b_type,
                          int a_mode, int b_mode, int d_type, int32_t epilogue, int c_type,
                          int bias_type) {
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return "cannot select CUDA device " + std::to_string(device);
  }
  GemmSpec g{device,
             m,
             n,
             k,
             static_cast<cudaDataType_t>(a_type),
             static_cast<cudaDataType_t>(b_type),
             static_cast<cudaDataType_t>(d_type),
             a_mode,
             b_mode,
             a_mode == kScaleVec16Ue4m3 || a_mode == kScaleVec32Ue8m0,
             epilogue,
             static_cast<cudaDataType_t>(c_type),
             static_cast<cudaDataType_t>(bias_type)};
  // Builds (and caches) the plan the calls of this spec will use.
  GemmPlan* plan = nullptr;
  const Status st = GetPlan(g, &plan);
  cudaSetDevice(prev);
  return st.ok() ? "" : st.message;
}

int64_t CublasLtVersion() { return static_cast<int64_t>(cublasLtGetVersion()); }

}  // namespace jax_bq::cuda

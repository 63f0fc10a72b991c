// tunewire::lora_linear in C++: the CPU kernel of the compiled-mode LoRA op.
//
// What: the same arithmetic as serving_service.cpu_lora_kernels.lora_linear (its Python twin,
// and the fallback when this file cannot be built), for vLLM's torch.compile'd model on CPU
// (serving_service/cpu_lora_compile.py). vLLM calls the op 4x per decoder layer every step
// (qkv, o, gate_up, down); most calls find no adapter weights and return. Measured here, a
// Python kernel costs ~17 us a call just to be entered (boxing the weight lists into Python
// objects), x120 calls a step - as much as the adapter arithmetic itself. This kernel is entered
// in ~5 us.
//
// Per call: rows are grouped by adapter slot once per (step, row count); per (layer, slot) a
// plan is built once - the filled slices' A.T side by side in float32 with the scale folded in,
// and B.T blocks at their output columns - so a slot's delta for the whole layer is two matmuls.
// Slices whose slot weights are all zero are never multiplied. Rows with a negative slot, or
// past the step's own tokens, get nothing. A slot that has only some of the rows (a mixed batch)
// gathers them and adds its delta back with plain row loops.
//
// Build: serving_service.cpu_lora_compile.load_kernels() (torch.utils.cpp_extension, ~40 s once,
// cached under TORCH_EXTENSIONS_DIR; `./dev setup` builds it ahead). The schema of
// tunewire::lora_linear is defined in Python; this file adds the CPU kernel and two helpers:
//   tunewire_cpp::set_step(int valid)  a new step whose first `valid` rows are real tokens
//   tunewire_cpp::forget()             slot weights were written: drop every plan
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <tuple>
#include <vector>

namespace {

struct Group {
  int64_t slot;
  std::vector<int64_t> rows;  // empty: every row
};

struct Plan {
  bool any = false;  // false: no slice of this layer holds weights for the slot
  at::Tensor a;      // [in, R] float32, scale folded in
  at::Tensor b;      // [R, sum(slices)] in the output dtype
};

int64_t step = 0, valid = 0;                 // set_step()
int64_t groups_step = -1, groups_rows = -1;  // what `groups` was computed for
std::vector<Group> groups;
std::map<std::tuple<const void*, int64_t, double, int>, Plan> plans;

const std::vector<Group>& groups_now(const at::Tensor& indices, int64_t n) {
  if (groups_step == step && groups_rows == n) return groups;
  groups.clear();
  groups_step = step;
  groups_rows = n;
  if (n == 0) return groups;
  at::Tensor idx = indices.narrow(0, 0, n);
  if (n > valid) {  // rows past the step's own tokens (padding) get no adapter
    idx = idx.clone();
    idx.narrow(0, valid, n - valid).fill_(-1);
  }
  auto [lo_t, hi_t] = at::aminmax(idx);
  const int64_t lo = lo_t.item<int64_t>(), hi = hi_t.item<int64_t>();
  if (hi < 0) return groups;
  if (lo == hi) {
    groups.push_back({hi, {}});
    return groups;
  }
  at::Tensor slots = std::get<0>(at::_unique(idx));
  for (int64_t i = 0; i < slots.size(0); ++i) {
    const int64_t s = slots[i].item<int64_t>();
    if (s < 0) continue;
    at::Tensor rows = idx.eq(s).nonzero().squeeze(1).contiguous();
    const int64_t* r = rows.data_ptr<int64_t>();
    groups.push_back({s, std::vector<int64_t>(r, r + rows.size(0))});
  }
  return groups;
}

at::Tensor slot_weights(const at::Tensor& w, int64_t slot) {
  at::Tensor ws = w.select(0, slot);
  return ws.dim() == 3 ? ws.select(0, 0) : ws;  // [1, out, in] -> [out, in]
}

const Plan& plan_for(at::TensorList a, at::TensorList b, double scale, c10::IntArrayRef slices,
                     int64_t slot, at::ScalarType dtype) {
  auto key = std::make_tuple(a[0].data_ptr(), slot, scale, static_cast<int>(dtype));
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  int64_t total = 0;
  for (int64_t size : slices) total += size;
  std::vector<at::Tensor> cols, rows;
  int64_t offset = 0;
  for (size_t j = 0; j < slices.size(); ++j) {
    at::Tensor wa = slot_weights(a[j], slot), wb = slot_weights(b[j], slot);  // [r, in], [size, r]
    if (wa.any().item<bool>() && wb.any().item<bool>()) {
      cols.push_back(wa.to(at::kFloat).t() * scale);
      at::Tensor block = at::zeros({wb.size(1), total}, wb.options().dtype(dtype));
      block.narrow(1, offset, slices[j]).copy_(wb.t());
      rows.push_back(block);
    }
    offset += slices[j];
  }
  Plan plan;
  if (!cols.empty()) {
    plan.any = true;
    plan.a = at::cat(cols, 1).contiguous();
    plan.b = at::cat(rows, 0);
  }
  return plans.emplace(key, std::move(plan)).first->second;
}

// x[rows] and out[rows] += d as plain row loops: on the few rows of a decode step
// index_select + index_add_ cost ~40 us a layer inside the engine (measured, torch profiler;
// index_add_ goes through scatter_add_ with an expanded index), more than the matmuls.
at::Tensor gather_rows(const at::Tensor& x, const std::vector<int64_t>& rows) {
  const int64_t n = static_cast<int64_t>(rows.size());
  if (x.stride(1) != 1) return x.index_select(0, at::tensor(rows));
  at::Tensor xs = at::empty({n, x.size(1)}, x.options());
  const size_t bytes = x.size(1) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(xs.data_ptr());
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(dst + i * bytes, src + rows[i] * x.stride(0) * x.element_size(), bytes);
  return xs;
}

// d: a fresh matmul result, so contiguous
void scatter_add_rows(at::Tensor& out, const std::vector<int64_t>& rows, const at::Tensor& d) {
  if (out.stride(1) != 1) {
    out.index_add_(0, at::tensor(rows), d);
    return;
  }
  const int64_t cols = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lora_rows", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* s = d.data_ptr<scalar_t>();
    for (size_t i = 0; i < rows.size(); ++i) {
      scalar_t* dst = o + rows[i] * out.stride(0);
      const scalar_t* src = s + i * cols;
      for (int64_t c = 0; c < cols; ++c) dst[c] += src[c];
    }
  });
}

void lora_linear(const at::Tensor& y, const at::Tensor& x, at::TensorList a, at::TensorList b,
                 double scale, c10::IntArrayRef slices, const at::Tensor& indices) {
  at::Tensor x2 = x.view({-1, x.size(-1)}), y2 = y.view({-1, y.size(-1)});
  for (const Group& g : groups_now(indices, x2.size(0))) {
    const Plan& p = plan_for(a, b, scale, slices, g.slot, y.scalar_type());
    if (!p.any) continue;
    at::Tensor out = y2.size(1) == p.b.size(1) ? y2 : y2.narrow(1, 0, p.b.size(1));
    if (g.rows.empty()) {
      out.addmm_(x2.to(at::kFloat).mm(p.a).to(y.scalar_type()), p.b);
    } else {
      at::Tensor xs = gather_rows(x2, g.rows).to(at::kFloat);
      scatter_add_rows(out, g.rows, xs.mm(p.a).to(y.scalar_type()).mm(p.b));
    }
  }
}

void set_step(int64_t valid_rows) {
  ++step;
  valid = valid_rows;
}

void forget() { plans.clear(); }

}  // namespace

TORCH_LIBRARY_IMPL(tunewire, CPU, m) { m.impl("lora_linear", &lora_linear); }

TORCH_LIBRARY(tunewire_cpp, m) {
  m.def("set_step(int valid) -> ()", &set_step);
  m.def("forget() -> ()", &forget);
}

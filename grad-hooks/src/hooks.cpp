// Post-accumulate-grad hooks for tensors handed over from Rust (a tch `C_tensor` is an `at::Tensor*`).
//
// The hook runs on the autograd engine's thread right after the parameter's AccumulateGrad node wrote `.grad`
// (on a GPU: after the accumulation was queued on the stream), exactly once per backward pass that reaches the
// parameter. It calls back into Rust with the index it was registered under and must not throw.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

extern "C" {
typedef void (*m3d_grad_ready_fn)(const void* ctx, size_t index);
}

namespace {

struct ReadyHook final : torch::autograd::PostAccumulateGradHook {
  ReadyHook(m3d_grad_ready_fn fn, const void* ctx, size_t index) : fn_(fn), ctx_(ctx), index_(index) {}
  void operator()(const torch::autograd::Variable&) override { fn_(ctx_, index_); }

  m3d_grad_ready_fn fn_;
  const void* ctx_;
  size_t index_;
};

char* copy_message(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

}  // namespace

extern "C" {

// Installs (fn, ctx, index) as the post-accumulate-grad hook of `tensor`, replacing any earlier one. Returns
// null on success, else a malloc'ed message (free it with m3d_grad_hooks_free).
char* m3d_set_grad_ready_hook(void* tensor, m3d_grad_ready_fn fn, const void* ctx, size_t index) {
  try {
    const at::Tensor& t = *static_cast<at::Tensor*>(tensor);
    if (!t.defined()) {
      return copy_message("the tensor is undefined");
    }
    if (!t.requires_grad()) {
      return copy_message("the tensor does not require a gradient");
    }
    if (!t.is_leaf()) {
      return copy_message("the tensor is not a leaf (only parameters accumulate gradients)");
    }
    torch::autograd::impl::set_post_acc_grad_hooks(t, std::make_unique<ReadyHook>(fn, ctx, index));
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(e.what());
  }
}

// Removes the post-accumulate-grad hook of `tensor`, if it has one.
char* m3d_clear_grad_ready_hook(void* tensor) {
  try {
    const at::Tensor& t = *static_cast<at::Tensor*>(tensor);
    if (t.defined() && t.is_leaf() && t.requires_grad()) {
      torch::autograd::impl::set_post_acc_grad_hooks(t, nullptr);
    }
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(e.what());
  }
}

// Sets reached[i] to 1 for each of the n tensors in `params` whose gradient accumulator the backward pass of
// `root` reaches, 0 for the others (DDP's search for unused parameters: the graph is walked from root's gradient
// edge through every node's next edges; a parameter is reached when its AccumulateGrad node is). An activation
// checkpoint (recompute.cpp) hides the parameters of its block until the backward pass re-runs it, so a graph
// with one counts every parameter as reached. Returns null on success, else a malloc'ed message.
char* m3d_reached_params(void* root, void* const* params, size_t n, uint8_t* reached) {
  try {
    const at::Tensor& r = *static_cast<at::Tensor*>(root);
    std::unordered_map<const c10::TensorImpl*, size_t> index;
    for (size_t i = 0; i < n; ++i) {
      reached[i] = 0;
      index.emplace(static_cast<at::Tensor*>(params[i])->unsafeGetTensorImpl(), i);
    }
    if (!r.defined() || !r.requires_grad()) {
      return nullptr;
    }
    std::vector<torch::autograd::Node*> stack;
    std::unordered_set<torch::autograd::Node*> seen;
    const auto root_edge = torch::autograd::impl::gradient_edge(r);
    if (root_edge.function) {
      stack.push_back(root_edge.function.get());
      seen.insert(root_edge.function.get());
    }
    while (!stack.empty()) {
      torch::autograd::Node* node = stack.back();
      stack.pop_back();
      if (node->name() == "M3dRecomputeBackward") {
        std::memset(reached, 1, n);
        return nullptr;
      }
      if (auto* acc = dynamic_cast<torch::autograd::AccumulateGrad*>(node)) {
        const auto it = index.find(acc->variable.unsafeGetTensorImpl());
        if (it != index.end()) {
          reached[it->second] = 1;
        }
      }
      for (const auto& edge : node->next_edges()) {
        if (edge.function && seen.insert(edge.function.get()).second) {
          stack.push_back(edge.function.get());
        }
      }
    }
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(e.what());
  }
}

void m3d_grad_hooks_free(char* message) { std::free(message); }

}  // extern "C"

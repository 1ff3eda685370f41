// Activation checkpointing: a block of layers runs without keeping its activations, and an autograd node re-runs
// it in the backward pass (torch.utils.checkpoint's reentrant form, written as a libtorch Node because tch has no
// custom autograd functions).
//
// The block is a Rust callback (fn + context). Forward: the callback runs under no_grad on detached inputs; its
// floating outputs get a `M3dRecomputeBackward` node as their gradient function, whose next edges are the inputs
// that require a gradient. Backward: the node restores the RNG state the forward saw (dropout draws the same
// masks), runs the callback again with grad mode on, back-propagates the incoming gradients through that
// recomputed graph (parameters inside the block accumulate their gradients there, firing their hooks), and
// returns the inputs' gradients.
//
// Unlike torch's reentrant checkpoint, the outputs are tracked whenever grad mode is on, even when no input
// requires a gradient (a frozen embedding feeding LoRA layers): the block's own parameters still get theirs.
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

extern "C" {
// Runs the block on `n` inputs (each a new at::Tensor* the callee takes ownership of) and pushes its outputs into
// `out` with m3d_recompute_push. Returns null, or a malloc'ed message.
typedef char* (*m3d_block_fn)(void* ctx, void* const* inputs, size_t n, void* out);
// Frees the callback's context (when the graph holding it is freed).
typedef void (*m3d_block_drop_fn)(void* ctx);
}

namespace {

char* copy_message(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

struct Block {
  m3d_block_fn call;
  m3d_block_drop_fn drop;
  void* ctx;
  Block(m3d_block_fn c, m3d_block_drop_fn d, void* x) : call(c), drop(d), ctx(x) {}
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  ~Block() { drop(ctx); }

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) const {
    std::vector<void*> ptrs;
    ptrs.reserve(inputs.size());
    for (const auto& t : inputs) {
      ptrs.push_back(new at::Tensor(t));
    }
    std::vector<at::Tensor> out;
    char* err = call(ctx, ptrs.data(), ptrs.size(), &out);
    if (err != nullptr) {
      std::string m(err);
      std::free(err);
      throw std::runtime_error(m);
    }
    return out;
  }
};

// The default generator of `device` (the one dropout draws from there), locked while its state is read or set.
at::Tensor rng_state(const c10::Device& device) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const c10::Device& device, const at::Tensor& state) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

struct M3dRecomputeBackward final : torch::autograd::Node {
  std::shared_ptr<Block> block;
  std::vector<at::Tensor> inputs;   // detached
  std::vector<bool> input_grad;     // which inputs have an edge (require a gradient)
  std::vector<bool> output_tracked; // which outputs carry this node as their gradient function
  c10::Device device{c10::kCPU};
  at::Tensor rng;

  std::string name() const override { return "M3dRecomputeBackward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    if (!block) {
      throw std::runtime_error(
          "activation checkpoint: this block was already back-propagated (its inputs are released)");
    }
    std::vector<at::Tensor> ins;
    ins.reserve(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
      at::Tensor d = inputs[i].detach();
      if (input_grad[i]) {
        d.requires_grad_(true);
      }
      ins.push_back(d);
    }
    std::vector<at::Tensor> outs;
    {
      // The forward's draws again, then the generator continues where the backward pass found it.
      const at::Tensor now = rng_state(device);
      set_rng_state(device, rng);
      c10::AutoGradMode grad(true);
      try {
        outs = block->run(ins);
      } catch (...) {
        set_rng_state(device, now);
        throw;
      }
      set_rng_state(device, now);
    }
    if (outs.size() != output_tracked.size()) {
      throw std::runtime_error("activation checkpoint: the block returned " + std::to_string(outs.size()) +
                               " tensors when recomputed, " + std::to_string(output_tracked.size()) +
                               " in the forward pass");
    }
    std::vector<at::Tensor> roots, root_grads;
    size_t k = 0;
    for (size_t j = 0; j < outs.size(); ++j) {
      if (!output_tracked[j]) {
        continue;
      }
      const at::Tensor& g = grads.at(k++);
      if (g.defined() && outs[j].requires_grad()) {
        roots.push_back(outs[j]);
        root_grads.push_back(g);
      }
    }
    if (!roots.empty()) {
      c10::AutoGradMode grad(true);
      torch::autograd::backward(roots, root_grads, /*retain_graph=*/false, /*create_graph=*/false);
    }
    torch::autograd::variable_list result;
    for (size_t i = 0; i < ins.size(); ++i) {
      if (input_grad[i]) {
        result.push_back(ins[i].grad());
      }
    }
    return result;
  }

  void release_variables() override {
    inputs.clear();
    block.reset();
  }
};

// A node owned the way this libtorch owns nodes: std::shared_ptr up to torch 2.11, c10::intrusive_ptr later
// (`Tensor::grad_fn`'s type says which). The branch not taken is never instantiated.
using NodePtr = std::decay_t<decltype(std::declval<at::Tensor>().grad_fn())>;

template <typename Ptr, typename T = M3dRecomputeBackward>
Ptr make_node(T** raw) {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>) {
    auto node = std::make_shared<T>();
    *raw = node.get();
    return node;
  } else {
    auto node = c10::make_intrusive<T>();
    *raw = node.get();
    return node;
  }
}

}  // namespace

extern "C" {

// Appends a copy of `tensor` (an at::Tensor*) to `out` (the std::vector<at::Tensor>* a block callback was given).
void m3d_recompute_push(void* out, void* tensor) {
  static_cast<std::vector<at::Tensor>*>(out)->push_back(*static_cast<at::Tensor*>(tensor));
}

// Runs the block (call, ctx) on the n `inputs` (at::Tensor*) as a checkpoint, and writes its outputs as new
// at::Tensor* (owned by the caller) into outputs[0..*n_out], at most `cap`. Takes ownership of ctx: `drop` frees it
// once no graph needs it (at once when grad mode is off, or on an error). Returns null, or a malloc'ed message.
char* m3d_recompute(void* const* inputs, size_t n, m3d_block_fn call, m3d_block_drop_fn drop, void* ctx,
                    void** outputs, size_t cap, size_t* n_out) {
  *n_out = 0;
  std::shared_ptr<Block> block;
  try {
    block = std::make_shared<Block>(call, drop, ctx);
  } catch (const std::exception& e) {
    drop(ctx);
    return copy_message(e.what());
  }
  try {
    std::vector<at::Tensor> detached;
    std::vector<bool> input_grad;
    std::vector<at::Tensor> edge_inputs;
    std::optional<c10::Device> device;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = *static_cast<at::Tensor*>(inputs[i]);
      if (!t.defined()) {
        return copy_message("activation checkpoint: input " + std::to_string(i) + " is undefined");
      }
      if (!device) {
        device = t.device();
      }
      detached.push_back(t.detach());
      const bool g = t.requires_grad();
      input_grad.push_back(g);
      if (g) {
        edge_inputs.push_back(t);
      }
    }
    const bool track = c10::GradMode::is_enabled();
    const c10::Device dev = device.value_or(c10::Device(c10::kCPU));
    at::Tensor rng;
    if (track) {
      rng = rng_state(dev);
    }
    std::vector<at::Tensor> outs;
    {
      c10::AutoGradMode no_grad(false);
      outs = block->run(detached);
    }
    if (outs.size() > cap) {
      return copy_message("activation checkpoint: the block returned " + std::to_string(outs.size()) +
                          " tensors, at most " + std::to_string(cap) + " are supported");
    }
    if (track) {
      M3dRecomputeBackward* raw = nullptr;
      const NodePtr node = make_node<NodePtr>(&raw);
      raw->set_next_edges(torch::autograd::collect_next_edges(edge_inputs));
      for (size_t j = 0; j < outs.size(); ++j) {
        at::Tensor& o = outs[j];
        bool aliases = o.is_view();
        for (const auto& d : detached) {
          aliases = aliases || o.is_same(d);
        }
        if (aliases) {
          // Its own storage: the output gets a gradient function, the saved input must not.
          c10::AutoGradMode no_grad(false);
          o = o.clone();
        }
        const bool tracked = o.defined() && torch::autograd::isDifferentiableType(o.scalar_type());
        if (tracked) {
          torch::autograd::set_history(o, node);
        }
        raw->output_tracked.push_back(tracked);
      }
      raw->block = block;
      raw->inputs = std::move(detached);
      raw->input_grad = std::move(input_grad);
      raw->device = dev;
      raw->rng = rng;
    }
    for (size_t j = 0; j < outs.size(); ++j) {
      outputs[j] = new at::Tensor(outs[j]);
    }
    *n_out = outs.size();
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(e.what());
  }
}

}  // extern "C"

extern "C" {

// A malloc'ed copy of `s` (a message handed to C++ from Rust, freed with std::free there).
char* m3d_recompute_message(const char* s) { return copy_message(s); }

}  // extern "C"

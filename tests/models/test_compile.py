"""torch.compile of the learners (`train.compile`): each forward is captured whole, its
backward too, and the compiled learner computes what the eager one does.

This runs on CPU and compiles with AOTAutograd and a backend that runs its graphs as they
are (what torch's `aot_eager` does): TorchDynamo captures the Python code into a graph and
AOTAutograd derives the backward graph from it, exactly as for `inductor`, but the graphs
then run op by op instead of as generated kernels. So it checks that nothing in the models
breaks the capture or changes the maths under it; it does not check inductor's generated
code, which on 2 CPU cores takes minutes to compile (benchmarks/gpu_check.py runs the
inductor path on a GPU).
"""

import pytest
import torch
from functorch.compile import make_boxed_func
from small_learners import blobs, small_learner
from torch._dynamo.backends.common import aot_autograd

# The smallest learners that still have every part: 16 px, two stages, K = 4 and a random
# VGG-16 layer in the perceptual loss.
TINY = ["model.image_size=16", "model.channels=[8,16]", "model.num_landmarks=4"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no graph cached by an earlier one counts for it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def losses_and_gradients(learner, image_i, image_j):
    # The same random warps (L_transform, the cycle's transformed appearance) on every call.
    torch.manual_seed(1)
    losses = learner(image_i, image_j)
    losses["total"].backward()
    gradients = {n: p.grad for n, p in learner.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in losses.items()}, gradients


@pytest.mark.parametrize("name", ["cycle", "imm", "part"])
def test_forward_and_backward_compile_to_one_graph_each_and_match_eager(name):
    images = blobs(4, size=16)
    pair = images[:2], images[2:]
    compiled, eager = small_learner(name, *TINY), small_learner(name, *TINY)
    explanation = torch._dynamo.explain(compiled)(*pair)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    graphs = {"forward": 0, "backward": 0}

    def run_as_is(kind):
        def compiler(graph, _):
            graphs[kind] += 1
            return make_boxed_func(graph)

        return compiler

    compiled.compile(
        backend=aot_autograd(fw_compiler=run_as_is("forward"), bw_compiler=run_as_is("backward"))
    )
    compiled_losses, compiled_gradients = losses_and_gradients(compiled, *pair)
    assert graphs == {"forward": 1, "backward": 1}

    eager_losses, eager_gradients = losses_and_gradients(eager, *pair)
    assert compiled_losses.keys() == eager_losses.keys()
    assert compiled_gradients.keys() == eager_gradients.keys()
    # The same fp32 kernels run in both, but AOTAutograd's functionalisation may reorder
    # them and their sums: float32 rounding, far below these tolerances, while a change to
    # the maths would be of the order of the values.
    for key, value in eager_losses.items():
        torch.testing.assert_close(compiled_losses[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in eager_gradients.items():
        torch.testing.assert_close(compiled_gradients[key], value, rtol=1e-4, atol=1e-6, msg=key)

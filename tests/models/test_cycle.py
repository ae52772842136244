from functools import partial

import pytest
import torch
from small_learners import blobs, gradient_coverage, loss_history
from small_learners import small_learner as build_small_learner

small_learner = partial(build_small_learner, "cycle")


def test_swapping_the_pair_swaps_every_output():
    # Without the transform prior: it draws a random similarity per image, so the two calls
    # would compare different draws.
    learner = small_learner("loss.lambda_transform=0")
    a, b = blobs(3, seed=1), blobs(3, seed=2)
    with torch.no_grad():
        ab, ba = learner.model(a, b), learner.model(b, a)
        for name in (
            "landmarks",
            "landmarks_again",
            "swapped",
            "recoded",
            "reconstructed",
            "flows",
        ):
            first, second = getattr(ab, name), getattr(ba, name)
            assert torch.allclose(first[0], second[1], atol=1e-5), name
            assert torch.allclose(first[1], second[0], atol=1e-5), name
        losses_ab, losses_ba = learner(a, b), learner(b, a)
    for name, value in losses_ab.items():
        assert value.item() == pytest.approx(losses_ba[name].item(), rel=1e-5), name


def test_cycle_uses_the_right_pose_for_each_reconstruction():
    learner = small_learner()
    a, b = blobs(2, seed=3), blobs(2, seed=4)
    with torch.no_grad():
        out = learner.model(a, b)
        p_a, p_b = out.landmarks
        p_a_again = learner.model.landmarks(out.swapped[1])  # I_ji carries a's pose
        p_b_again = learner.model.landmarks(out.swapped[0])  # I_ij carries b's pose
    assert torch.allclose(out.landmarks_again[0], p_a_again, atol=1e-6)
    assert torch.allclose(out.landmarks_again[1], p_b_again, atol=1e-6)
    assert out.swapped[0].shape == a.shape and out.reconstructed[0].shape == a.shape
    assert p_a.shape == (2, 10, 2) and p_a.abs().max() <= 1 and not torch.allclose(p_a, p_b)


def test_every_trainable_parameter_gets_a_gradient_and_vgg_stays_frozen():
    learner = small_learner()
    learner(blobs(4, seed=5), blobs(4, seed=6))["total"].backward()
    trainable, no_grad = gradient_coverage(learner)
    assert trainable and all(n.startswith("model.") for n in trainable)
    assert no_grad == []
    assert all(p.grad is None for p in learner.vgg.parameters())


def test_loss_weights_scale_their_terms():
    a, b = blobs(2, seed=7), blobs(2, seed=8)
    with torch.no_grad():
        base = small_learner()(a, b)
        weighted = small_learner(
            "loss.lambda_cycle=2",
            "loss.lambda_inv=0",
            "loss.lambda_equiv=3",
            "loss.lambda_recon=0.5",
            "loss.lambda_transform=2",
            "loss.lambda_separation=4",
        )(a, b)
    # Both learners draw the same random similarities: each is built right after manual_seed.
    expected = (
        2 * base["cycle"]
        + 3 * base["equiv"]
        + 0.5 * base["recon"]
        + 2 * base["transform"]
        + 4 * base["sep"]
    )
    assert weighted["total"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_consistency_terms_ramp_up_over_the_warmup_in_training_only():
    learner = small_learner(
        "loss.consistency_warmup=4",
        "loss.lambda_cycle=0",
        "loss.lambda_recon=0",
        "loss.lambda_transform=0",
        "loss.lambda_separation=0",
    )
    a, b = blobs(2, seed=11), blobs(2, seed=12)
    with torch.no_grad():
        learner.eval()
        full = learner(a, b)
        assert full["total"].item() == pytest.approx((full["inv"] + full["equiv"]).item())
        learner.train()
        ramped = [learner(a, b) for _ in range(6)]
    for passes, losses in enumerate(ramped, start=1):
        share = min(1.0, passes / 4)
        expected = share * (losses["inv"] + losses["equiv"])
        assert losses["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert learner.forward_passes.item() == 6
    assert "forward_passes" in learner.state_dict()  # so that a resumed run keeps its place


def test_training_on_a_fixed_batch_reduces_the_loss():
    learner = small_learner()
    history = loss_history(learner, blobs(4, seed=9), blobs(4, seed=10), steps=150)
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_bf16_learner_trains_as_deepspeed_runs_it():
    learner = small_learner()
    # DeepSpeed (0.19) casts the parameters to bf16 and leaves the buffers in fp32.
    for parameter in learner.parameters():
        parameter.data = parameter.data.bfloat16()
    a, b = blobs(2, seed=13).bfloat16(), blobs(2, seed=14).bfloat16()
    losses = learner(a, b)
    losses["total"].backward()
    assert torch.isfinite(losses["total"]).item()
    assert learner.model.pose_encoder.score_head.weight.grad.abs().sum() > 0

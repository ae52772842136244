from functools import partial

import pytest
import torch
from small_learners import blobs, gradient_coverage, loss_history
from small_learners import small_learner as build_small_learner

small_learner = partial(build_small_learner, "cycle")


def test_swapping_the_pair_swaps_every_output():
    # The learner without the similarity-moved views: it draws a random similarity per image,
    # so two calls would compare different draws. The model gets the same moved views, swapped.
    learner = small_learner("loss.lambda_transform=0", "loss.recon_appearance=same")
    a, b = blobs(3, seed=1), blobs(3, seed=2)
    moved_a, moved_b = blobs(3, seed=11), blobs(3, seed=12)
    with torch.no_grad():
        ab = learner.model(a, b, torch.cat([moved_a, moved_b]))
        ba = learner.model(b, a, torch.cat([moved_b, moved_a]))
        assert torch.allclose(ab.moved_landmarks, ba.moved_landmarks.roll(3, 0), atol=1e-5)
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
    # Evaluation mode: BatchNorm then normalises each image on its own, as a lone call does.
    learner = small_learner().eval()
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
            "loss.lambda_concentration=0.25",
        )(a, b)
    # Both learners draw the same random warps: each is built right after manual_seed.
    expected = (
        2 * base["cycle"]
        + 3 * base["equiv"]
        + 0.5 * base["recon"]
        + 2 * base["transform"]
        + 4 * base["sep"]
        + 0.25 * base["conc"]
    )
    assert weighted["total"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_consistency_terms_ramp_up_over_the_warmup_in_training_only():
    learner = small_learner(
        "loss.consistency_warmup=4",
        "loss.lambda_cycle=0",
        "loss.lambda_recon=0",
        "loss.lambda_transform=0",
        "loss.lambda_separation=0",
        "loss.lambda_concentration=0",
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


def test_the_one_hop_reconstruction_takes_its_codes_from_the_warped_images():
    learner = small_learner("loss.perceptual=pixels").eval()  # eval: BatchNorm per image
    a, b = blobs(2, seed=15), blobs(2, seed=16)
    images = torch.cat([a, b])
    with torch.no_grad():
        torch.manual_seed(3)
        losses = learner(a, b)
        torch.manual_seed(3)  # the same warps, drawn first in forward()
        _, moved = learner.warped_views(images)
        pose = learner.model.encode(images)[0]
        codes = learner.model.encode(moved)[1]
        redrawn = learner.model.decode(codes, pose.points)
    per_image = (redrawn - images).abs().flatten(1).mean(1)
    expected = per_image[:2].mean() + per_image[2:].mean()
    assert losses["recon"].item() == pytest.approx(expected.item(), rel=1e-5)


def _decoder_sensitivity(learner, images: torch.Tensor) -> tuple[float, float]:
    """How much D's output moves when every landmark moves by 0.2, and when only the
    background code is swapped with another image's: mean absolute pixel changes."""
    with torch.no_grad():
        pose, codes = learner.model.encode(images)
        drawn = learner.model.decode(codes, pose.points)
        moved = learner.model.decode(codes, pose.points + 0.2)
        swapped_codes = codes.clone()
        swapped_codes[:, -1] = codes.roll(1, 0)[:, -1]
        swapped = learner.model.decode(swapped_codes, pose.points)
    return (moved - drawn).abs().mean().item(), (swapped - drawn).abs().mean().item()


def test_after_a_short_fit_the_landmarks_move_the_image_more_than_the_background_code():
    # The background code is painted everywhere, so it is where geometry could leak past the
    # landmarks; codes taken from a warped copy cannot say where the parts are.
    learner = small_learner("loss.perceptual=pixels")
    loss_history(learner, blobs(8, seed=17), blobs(8, seed=18), steps=80)
    move, swap = _decoder_sensitivity(learner.eval(), blobs(8, seed=19))
    assert move > swap, (move, swap)


def test_the_concentration_prior_sharpens_the_score_maps_during_a_short_fit():
    images, others = blobs(8, seed=20), blobs(8, seed=21)
    spreads = {}
    for weight in (0, 1):
        learner = small_learner("loss.perceptual=pixels", f"loss.lambda_concentration={weight}")
        before = learner.model.pose_encoder(images).spread.mean().item()
        loss_history(learner, images, others, steps=40)
        spreads[weight] = (before, learner.model.pose_encoder(images).spread.mean().item())
    (before, with_prior), (_, without) = spreads[1], spreads[0]
    assert with_prior < 0.8 * before and with_prior < 0.8 * without, spreads

"""The sweep's search space and searchers, without running trials: each algorithm suggests
trial values within the configured ranges."""

from ulm_dist.tune.config import sweep_config_from_dict
from ulm_dist.tune.sweep import search_space, searcher

SPACE = {
    "train.lr": {"loguniform": [1e-4, 1e-2]},
    "model.heatmap_std": {"uniform": [0.05, 0.2]},
    "model.num_landmarks": {"randint": [3, 5]},
    "loss.lambda_cycle": {"values": [0.5, 1.0]},
}


def check_suggestion(values: dict) -> None:
    assert 1e-4 <= values["train.lr"] <= 1e-2
    assert 0.05 <= values["model.heatmap_std"] <= 0.2
    assert values["model.num_landmarks"] in (3, 4, 5)
    assert values["loss.lambda_cycle"] in (0.5, 1.0)


def test_optuna_suggests_values_in_the_space():
    sweep = sweep_config_from_dict(
        {"metric": "loss/total", "search": {"algorithm": "optuna"}, "space": SPACE}
    )
    algorithm = searcher(sweep, concurrency=2)
    assert algorithm.set_search_properties(sweep.metric, sweep.mode, search_space(sweep))
    suggestions = [algorithm.suggest(f"trial_{i}") for i in range(3)]
    for values in suggestions[:2]:
        check_suggestion(values)
    assert suggestions[2] is None  # two at a time: the third waits for one to finish


def test_grid_lists_every_value_and_random_draws_one():
    space = {"loss.lambda_cycle": {"values": [0.5, 1.0]}}
    grid, random = (
        sweep_config_from_dict(
            {"metric": "loss/total", "search": {"algorithm": algorithm}, "space": space}
        )
        for algorithm in ("grid", "random")
    )
    assert search_space(grid) == {"loss.lambda_cycle": {"grid_search": [0.5, 1.0]}}
    assert search_space(random)["loss.lambda_cycle"].categories == [0.5, 1.0]
    assert searcher(grid, concurrency=3).max_concurrent == 3

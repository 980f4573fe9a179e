"""rtdmd.stages: the plan of a run (one stage, or the stages its options declare), stage run names and
each stage's training loop. The two-stage run itself (layout, resume, MLflow) is tested in test_rtdmd.py."""

from __future__ import annotations

import pytest
import torch

from rtdmd import stages
from rtdmd.api import make_config
from rtdmd.errors import UserError
from rtdmd.rewards.registry import register_reward, unregister_reward


@pytest.fixture(autouse=True)
def toy_reward():
    register_reward("test_stage_right", lambda x, prompts: torch.tanh(x[:, 0]), differentiable=True)
    yield
    unregister_reward("test_stage_right")


def _rtdmd(**method):
    return make_config("rtdmd", backend="toy2d", overrides={
        "method": {"rewards": {"test_stage_right": 1.0}, "stage1_train": {"max_steps": 7, "batch_size": 32}, **method},
        "train": {"max_steps": 5, "batch_size": 16}, "tracking": {"run_name": "two"}})


def test_a_method_without_stages_is_one_stage_trained_into_out():
    cfg = make_config("dmd2", backend="toy2d")
    plan = stages.plan(cfg)
    assert len(plan) == 1 and plan[0].name == "" and plan[0].cfg is cfg


def test_rtdmd_declares_stage1_then_stage2_with_their_own_training_loops():
    cfg = _rtdmd()
    plan = stages.plan(cfg)
    assert [st.name for st in plan] == ["stage1", "stage2"]
    s1, s2 = plan[0].cfg, plan[1].cfg
    assert s1.method_name == "ac-dmd" and s1.method == cfg.method.stage1
    assert (s1.train.max_steps, s1.train.batch_size) == (7, 32)  # stage1_train merged over train
    assert s2.method_name == "rtdmd" and s2.method.stage == 2 and (s2.train.max_steps, s2.train.batch_size) == (5, 16)
    assert (s1.tracking.run_name, s2.tracking.run_name) == ("two/stage1", "two/stage2")
    assert cfg.tracking.run_name == "two" and cfg.method.stage == 0  # the plan leaves the run's own config alone


def test_one_stage_of_rtdmd_trains_straight_into_out():
    assert [(st.name, st.cfg.method_name) for st in stages.plan(_rtdmd(stage=1))] == [("stage1", "ac-dmd")]
    assert [(st.name, st.cfg.method_name) for st in stages.plan(_rtdmd(stage=2, init="x"))] == [("stage2", "rtdmd")]


def test_unknown_rewards_are_refused_before_any_stage_trains():
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        stages.plan(_rtdmd(rewards={"nope": 1.0}))


def test_stages_are_announced_and_the_result_counts_every_stage(tmp_path, capsys):
    over = {"backend": {"hidden": 16, "depth": 2}, "tracking": {"enabled": False},
            "method": {"rewards": {"test_stage_right": 1.0}, "group_size": 4, "guidance": 1.0,
                       "stage1": {"guidance": 1.0, "ttur": 1, "init": ""},
                       "stage1_train": {"max_steps": 3, "batch_size": 16, "checkpoint_every": 3}},
            "train": {"max_steps": 2, "batch_size": 16, "device": "cpu", "num_threads": 1, "checkpoint_every": 2}}
    cfg = make_config("rtdmd", backend="toy2d", overrides=over)
    r = stages.run_stages(cfg, out=tmp_path / "run", show_progress=False)
    err = capsys.readouterr().err
    assert f"stage 1 of 2 (ac-dmd): 3 steps into {tmp_path / 'run' / 'stage1'}\n" in err
    assert f"stage 2 of 2 (rtdmd): 2 steps into {tmp_path / 'run' / 'stage2'}, starting from " in err
    assert err.index("stage 1 of 2") < err.index("stage 2 of 2")
    assert r.steps == 5 and r.stage_steps == {"stage1": 3, "stage2": 2}
    # a --resume of the finished run skips both stages, says so, and still counts every stage
    again = stages.run_stages(make_config("rtdmd", backend="toy2d", overrides=over), out=tmp_path / "run", resume=True,
                              show_progress=False)
    err = capsys.readouterr().err
    assert "stage 1 of 2 (ac-dmd): finished earlier (3 steps in" in err and "stage 2 of 2 (rtdmd): finished earlier" in err
    assert again.steps == 5 and again.checkpoint.resolve() == r.checkpoint.resolve()


def test_train_summary_line_counts_every_stage(cli, tmp_path):
    import yaml

    cfg = {"backend": {"hidden": 16, "depth": 2}, "tracking": {"enabled": False},
           "method": {"rewards": {"test_stage_right": 1.0}, "group_size": 4, "guidance": 1.0,
                      "stage1": {"guidance": 1.0, "ttur": 1, "init": ""},
                      "stage1_train": {"max_steps": 3, "batch_size": 16, "checkpoint_every": 3}},
           "train": {"max_steps": 2, "batch_size": 16, "device": "cpu", "num_threads": 1, "checkpoint_every": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("train", "rtdmd", "--backend", "toy2d", "--config", "c.yaml", "--out", "run", "--quiet")
    assert r.exit_code == 0, r.output
    assert "trained rtdmd for 5 steps (stage1 3 + stage2 2) in " in r.stdout
    assert "stage 1 of 2 (ac-dmd)" in r.stderr and "stage 2 of 2 (rtdmd)" in r.stderr

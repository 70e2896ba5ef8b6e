import numpy as np
import pytest
import torch

from mtrl import checkpoint
from mtrl.config import Config
from mtrl.runner import Trainer


def _cfg(tmp_path, **kw):
    cfg = Config(suite="dmc-walker", workers=0, total_steps=600, eval_every=0, checkpoint_every=0, eval_episodes=1,
                 chunk_steps=10, progress=False, log_every=5, run_dir=str(tmp_path / "run"), save_replay=True, compile="off")
    cfg.backbone_kwargs = {"width": 16, "depth": 1}
    cfg.sac.batch_size = 8
    cfg.sac.learning_starts = 30
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_atomic_save_and_weights_only_load(tmp_path):
    p = tmp_path / "c.pt"
    checkpoint.save(p, {"x": torch.arange(3), "meta": {"a": 1, "b": "s"}})
    out = checkpoint.load(p)
    assert out["x"].tolist() == [0, 1, 2] and out["meta"] == {"a": 1, "b": "s"}
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_truncated_or_missing_checkpoint_gives_clear_error(tmp_path):
    p = tmp_path / "c.pt"
    checkpoint.save(p, {"x": torch.zeros(1000)})
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load(p)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing")


def test_resume_restores_parameters_optimizers_and_counters_exactly(tmp_path):
    cfg = _cfg(tmp_path)
    tr = Trainer(cfg, tmp_path / "run")
    tr.start()
    tr.run_until(300)
    tr.close()
    assert tr.updates > 0
    tr.save_checkpoint()
    saved = checkpoint.load(tmp_path / "run")

    tr2 = Trainer(_cfg(tmp_path), tmp_path / "run", resume=saved)
    assert (tr2.env_steps, tr2.updates, tr2.episodes) == (tr.env_steps, tr.updates, tr.episodes)
    np.testing.assert_array_equal(tr2.task_steps, tr.task_steps)
    for a, b in [(tr.agent.actor, tr2.agent.actor), (tr.agent.critic, tr2.agent.critic),
                 (tr.agent.critic_target, tr2.agent.critic_target)]:
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(v, w), k
    assert torch.equal(tr.agent.log_alpha, tr2.agent.log_alpha)
    for o1, o2 in [(tr.agent.actor_opt, tr2.agent.actor_opt), (tr.agent.critic_opt, tr2.agent.critic_opt),
                   (tr.agent.alpha_opt, tr2.agent.alpha_opt)]:
        s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
        assert s1.keys() == s2.keys() and len(s1) > 0
        for k in s1:
            for name in s1[k]:
                assert torch.equal(s1[k][name], s2[k][name])
    np.testing.assert_array_equal(tr2.replay.obs, tr.replay.obs)
    # Same state => the next update is identical.
    b1, b2 = tr.replay.sample(8), tr2.replay.sample(8)
    for k in b1:
        assert torch.equal(b1[k], b2[k])
    i1, i2 = tr.agent.update(b1), tr2.agent.update(b2)
    assert torch.equal(i1["critic_losses"], i2["critic_losses"])
    for (k, v), (_, w) in zip(tr.agent.actor.state_dict().items(), tr2.agent.actor.state_dict().items()):
        assert torch.equal(v, w), k

"""heal.eda_placement in verl: the settings, the worker method and the worker class heal_sync picks."""

import pytest

verl = pytest.importorskip("verl")

from heal.integrations.verl.settings import HealSettings  # noqa: E402


def _block(**kw):
    return {"general_sources": ["commonsense_qa"], **kw}


def test_placement_and_threads_settings():
    s = HealSettings.from_block(_block())
    assert s.eda_placement == "driver" and s.eda_threads is None
    s = HealSettings.from_block(_block(eda_placement="workers", eda_threads=3))
    assert s.eda_placement == "workers" and s.eda_threads == 3
    for bad in ("gpu", "", None):
        with pytest.raises(ValueError, match=r"heal\.eda_placement"):
            HealSettings.from_block(_block(eda_placement=bad))
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match=r"heal\.eda_threads"):
            HealSettings.from_block(_block(eda_threads=bad))


def test_worker_method_is_registered_one_to_all():
    from verl.single_controller.base.decorator import MAGIC_ATTR, Dispatch

    from heal.integrations.verl.workers import WORKER_METHOD, HealActorRolloutRefWorker, HealEDAWorker

    for cls in (HealEDAWorker, HealActorRolloutRefWorker):
        attrs = getattr(getattr(cls, WORKER_METHOD), MAGIC_ATTR)
        assert attrs["dispatch_mode"] == Dispatch.ONE_TO_ALL


@pytest.mark.parametrize("fused, placement, expected", [
    (False, "driver", None),
    (False, "workers", "HealEDAWorker"),
    (True, "driver", "HealActorRolloutRefWorker"),
    (True, "workers", "HealActorRolloutRefWorker"),
])
def test_heal_sync_picks_the_worker_class(monkeypatch, fused, placement, expected):
    import ray

    from heal.integrations.verl.trainer import HealPPOTrainerSync
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    class Verls:
        pass

    def base_init(self):
        self.role_worker_mapping = {Role.ActorRollout: Verls}

    monkeypatch.setattr(PPOTrainerSync, "_init_resource_pool_mgr", base_init)
    monkeypatch.setattr(ray, "remote", lambda cls: cls)
    trainer = HealPPOTrainerSync.__new__(HealPPOTrainerSync)
    trainer.heal_settings = HealSettings.from_block(_block(fused_entropy=fused, eda_placement=placement))
    trainer._init_resource_pool_mgr()
    got = trainer.role_worker_mapping[Role.ActorRollout]
    assert (got is Verls) if expected is None else (got.__name__ == expected)

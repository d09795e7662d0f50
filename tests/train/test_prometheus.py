"""Training metrics reach Prometheus as the gauges the Grafana dashboard plots."""

from lmforge.train.metrics import GAUGES, TrainGauges, exported_names


class FakeGauge:
    made: dict = {}

    def __init__(self, name, description, tag_keys):
        self.name, self.tag_keys, self.values = name, tag_keys, []
        FakeGauge.made[name] = self

    def set(self, value, tags):
        self.values.append((value, tags))


def test_each_logged_metric_sets_its_gauge_with_the_run_label():
    FakeGauge.made = {}
    gauges = TrainGauges("pretrain-0123abcd", factory=FakeGauge)
    gauges.update({"step": 10, "loss": 3.5, "tokens_per_s": 1200.0, "mfu": 0.41, "time": 1.0})
    gauges.update({"step": 20, "loss": 3.1, "val_bpb": 1.2, "note": "x", "flag": True})
    made = FakeGauge.made
    assert set(made) == {
        "lmforge_train_step", "lmforge_train_loss", "lmforge_train_tokens_per_second",
        "lmforge_train_mfu", "lmforge_train_val_bits_per_byte",
    }  # fmt: skip
    assert made["lmforge_train_loss"].values == [
        (3.5, {"run": "pretrain-0123abcd"}),
        (3.1, {"run": "pretrain-0123abcd"}),
    ]
    assert made["lmforge_train_loss"].tag_keys == ("run",)
    assert exported_names() == {"ray_" + name for name, _ in GAUGES.values()}

"""The cost ledger: what the run's own training cost, and each deletion event's unlearning cost
against the oracle's."""

from __future__ import annotations

from jaxunlearn import records
from jaxunlearn.trainer import Cost


class Ledger:
    def __init__(self):
        self.training = Cost()  # the run's own (phase) training
        self.events: list[dict] = []  # one cost record per deletion event
        self.replacements = 0  # members reinitialised or rewound

    def totals(self, strategy: str, oracle_seconds: float | None,
               baseline_unlearning: str | None) -> records.RunCost:
        """The run's unlearning cost against the oracle's, summed over deletion events;
        ``baseline_unlearning`` names the baseline's unlearning (None: no baseline)."""
        def total(key, events=self.events):
            return sum(e[key] for e in events)

        ran, spent = total("member_examples"), total("seconds")
        oracle = {key: sum(e["oracle"][key] for e in self.events)
                  for key in ("member_epochs", "member_examples", "seconds")}
        out = {"strategy": strategy, "events": len(self.events),
               "ids": total("ids"), "member_epochs": total("member_epochs"),
               "member_examples": ran, "seconds": spent,
               "invalidated_observed": total("invalidated_observed"),
               "invalidated_expected": total("invalidated_expected"),
               "oracle": oracle, "oracle_final_seconds": oracle_seconds,
               "speedup_vs_oracle": oracle["member_examples"] / ran if ran else None,
               "speedup_vs_oracle_seconds": oracle["seconds"] / spent if ran and spent else None,
               "training": self.training.as_dict()}
        if baseline_unlearning is not None:
            base = [e["baseline"] for e in self.events]
            out["baseline"] = {"unlearning": baseline_unlearning,
                               "member_epochs": sum(b["member_epochs"] for b in base),
                               "member_examples": sum(b["member_examples"] for b in base),
                               "seconds": sum(b["seconds"] for b in base),
                               # honouring each deletion by retraining the baseline from
                               # scratch (its own measured training of the stages so far)
                               "retraining": {key: sum(b["oracle"][key] for b in base)
                                              for key in ("member_examples", "seconds")}}
        return out

    def state_dict(self) -> dict:
        return {"training": self.training.as_dict(), "events": self.events,
                "replacements": self.replacements}

    def load_state_dict(self, state: dict) -> None:
        self.training = Cost(**state["training"])
        self.events, self.replacements = list(state["events"]), state["replacements"]

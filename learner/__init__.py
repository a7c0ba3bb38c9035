"""The background learner (labels, pairs, DPO, gate, hot-swap). Not built yet: see issue 3."""

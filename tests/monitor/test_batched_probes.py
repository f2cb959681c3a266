"""A record's probes scored together (`score_probes`: one call, deduplicated, length-sorted batches) give what
each probe scored alone gives, on every declared family."""

import pytest
import torch

from editors import create_editor
from monitor.metrics import edit_values, keep_references, score_probes
from monitor.plan import make_probe
from monitor.reference import ReferenceStore
from tests.tiny_models import BUILDERS, random_image, tiny

IMAGES = {"a.png": random_image(11), "b.png": random_image(12, (28, 20)), "c.png": random_image(13, (16, 30))}
PLAN = [  # (metric, question, answer, image): as a record's probe plan asks them, lengths mixed
    ("reliability", "what does the creature in the image eat?", "red berries", "a.png"),
    ("t_gen", "which food is eaten by the creature shown here?", "red berries", "a.png"),
    ("i_gen", "what does the creature in the image eat?", "red berries", "b.png"),
    ("t_loc", "which country is the city of Paris in?", "France", None),
    ("i_loc", "who keeps the creature?", "a tall keeper named Rolf", "c.png"),
    ("port_1hop", "where does the creature live?", "Paris", "a.png"),
    ("port_2hop", "which language is spoken where the creature in the image lives?", "French", "a.png"),
    ("reliability", "what does the creature in the image eat?", "red berries", "a.png"),  # asked twice: run once
]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_probes_scored_together_equal_probes_scored_alone(family):
    editor = create_editor("none", tiny(family))
    probes = [make_probe(m, q, a, i, IMAGES.__getitem__) for m, q, a, i in PLAN]
    references = ReferenceStore()
    keep_references(probes, score_probes(editor, probes, top_k=10), references)
    together = score_probes(editor, probes, references)
    assert len(together) == len(PLAN) - 1
    for probe in probes:
        gather = [references[probe.key].topk_ids.long()] if probe.key in references else None
        alone = editor.score([probe.query], top_k=1, gather=gather)[0]
        batched = together[probe.key]
        assert batched.argmax_ids.tolist() == alone.argmax_ids.tolist()
        torch.testing.assert_close(batched.target_logprobs, alone.target_logprobs, atol=1e-5, rtol=0)
        if gather is not None:
            torch.testing.assert_close(batched.gathered_logprobs, alone.gathered_logprobs, atol=1e-5, rtol=0)
    unique = list({p.key: p for p in probes}.values())
    one_by_one = {p.key: score_probes(editor, [p], references)[p.key] for p in unique}
    batched, alone = edit_values(unique, together, references), edit_values(unique, one_by_one, references)
    assert batched.keys() == alone.keys() == {"reliability", "t_gen", "i_gen", "t_loc", "t_loc_kl", "i_loc",
                                              "i_loc_kl", "port_1hop", "port_2hop"}
    for key in batched:  # token accuracies and agreements exactly, KL within float tolerance
        assert batched[key] == pytest.approx(alone[key], abs=1e-5 if key.endswith("_kl") else 0)

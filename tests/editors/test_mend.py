"""MEND: the gradient's token factors, the identity-initialised network, training and its guard rails."""

import math

import pytest
import torch

from editors import EditExample, EditRequest, Query, create_editor
from editors.hypernet import NotTrainedError, token_factors
from editors.losses import answer_nll
from editors.mend import GradientTransform
from tests.tiny_models import random_image, tiny, tiny_llava
from monitor.probes import edit_success

EDITS = [
    EditRequest("which animal is shown in the picture?", "a brown dog", random_image(31), "a cat", key="a"),
    EditRequest("describe the image", "a small cat", random_image(32), None, key="b"),
    EditRequest("what is the capital of France?", "Paris", random_image(33), "Lyon", key="c"),
]
EXAMPLES = [
    EditExample(e, generality=(Query(e.prompt, e.target, random_image(40 + i)),),
                locality=(Query("the quick brown", "fox"), Query("what is the colour", "red", random_image(50 + i))))
    for i, e in enumerate(EDITS)
]


@pytest.mark.parametrize(("family", "layers"), [("llava", (-1,)), ("llava", (0, 1)), ("blip2-opt", (-1,))])
def test_token_factors_rebuild_the_true_gradient(family, layers):
    lvlm = tiny(family)
    params = lvlm.parameter_group("llm", layers=layers)
    factors = token_factors(lvlm, params, EDITS[0].query)
    loss = answer_nll(lvlm, [EDITS[0].query])
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, (u, delta)), grad in zip(factors.items(), grads):
        assert u.shape[1] == params[name].shape[1] and delta.shape[1] == params[name].shape[0]
        torch.testing.assert_close(delta.T @ u, grad, atol=1e-6, rtol=1e-4)  # MEND eq. 1
    # Only the answer's positions reach the loss through the last layer; earlier layers see more tokens.
    answer_tokens = lvlm.score([EDITS[0].query])[0].target_ids.numel()
    assert factors[list(params)[-1]][0].shape[0] == answer_tokens
    assert all(p.grad is None for p in lvlm.model.parameters())


def test_the_untrained_network_is_a_plain_gradient_step():
    g = GradientTransform(d_in=8, d_out=5, rank=4, edit_lr=1e-3)
    u, delta = torch.randn(3, 8), torch.randn(3, 5)
    torch.testing.assert_close(g(u, delta), -1e-3 * delta.T @ u)
    g.mean.fill_(1.0)  # standardisation is applied before the network
    g.std.fill_(2.0)
    torch.testing.assert_close(g(u, delta), -1e-3 * ((delta - 1) / 2).T @ ((u - 1) / 2))


def test_untrained_mend_refuses_to_edit():
    editor = create_editor("mend", tiny_llava(seed=2))
    with pytest.raises(NotTrainedError, match="simulate train-editor --method mend"):
        editor.apply(EDITS[0])
    with pytest.raises(ValueError, match="no training examples"):
        editor.train([])


def test_standardisation_is_each_weights_token_mean_and_sample_std_over_the_train_edits():
    editor = create_editor("mend", tiny_llava(seed=2))
    editor._prepare(EXAMPLES)
    rows = {name: [] for name in editor.tracker.params}
    for example in EXAMPLES:
        for name, (u, delta) in token_factors(editor.lvlm, editor.tracker.params, example.edit.query).items():
            rows[name].append(torch.cat([u, delta], -1).double())
    for g, name in zip(editor.net, editor.tracker.params):
        x = torch.cat(rows[name])
        assert len(x) > len(EXAMPLES)  # every answer token of every edit, not one row an edit
        torch.testing.assert_close(g.mean.double(), x.mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g.std.double(), x.std(0, correction=1).clamp(min=1e-8), rtol=1e-4, atol=1e-7)


def test_a_feature_that_barely_varied_over_the_train_tokens_is_not_divided_by_almost_nothing(monkeypatch):
    """Each feature's std is at least a hundredth of its own factor's (u's or delta's) root-mean-square std; a factor
    that never varied keeps the identity standardisation."""
    import editors.mend

    editor = create_editor("mend", tiny_llava(seed=2))
    (_, weight), (second, _) = list(editor.tracker.params.items())[:2]
    d_out, d_in = weight.shape
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(3, d_in, generator=generator, dtype=torch.float64)
    delta = 1e-3 * torch.randn(3, d_out, generator=generator, dtype=torch.float64)  # gradients: a smaller scale
    u[:, 0], delta[:, 0] = 0.5, 2e-3  # the same on every train token
    constant = torch.randn(1, d_in + d_out, generator=generator, dtype=torch.float64).expand(3, -1)
    assert editor.tracker.params[second].shape == weight.shape  # gate_proj and up_proj
    factors = {name: (u, delta) for name in editor.tracker.params}
    factors[second] = constant.split([d_in, d_out], -1)
    monkeypatch.setattr(editors.mend, "token_factors", lambda *args: factors)
    editor._prepare(EXAMPLES[:1])

    g = editor.net[0]  # the first weight's network
    for part, x in ((slice(0, d_in), u), (slice(d_in, None), delta)):
        sample = x.std(0, correction=1)
        floor = 1e-2 * sample.pow(2).mean().sqrt()
        assert sample[1:].min() > floor  # only the constant feature is floored
        torch.testing.assert_close(g.std[part].double()[1:], sample[1:], rtol=1e-5, atol=0)
        torch.testing.assert_close(g.std[part].double()[0], floor, rtol=1e-5, atol=0)
    torch.testing.assert_close(editor.net[1].std, torch.ones(d_in + d_out))  # not scaled, only centred
    torch.testing.assert_close(editor.net[1].mean.double(), constant[0], rtol=1e-6, atol=0)


def test_the_seeded_network_leaves_the_callers_generators_alone(monkeypatch):
    # torch.manual_seed seeds every CUDA generator too, which a process's other CUDA work draws from.
    models = [tiny_llava(seed=2), tiny_llava(seed=2)]
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    torch.manual_seed(7)
    expected = torch.rand(3)
    seeded.clear()
    torch.manual_seed(7)
    first = create_editor("mend", models[0], {"seed": 5})
    assert torch.equal(torch.rand(3), expected) and seeded == [7]  # the CPU generator goes on; no CUDA seeding
    second = create_editor("mend", models[1], {"seed": 5})
    for a, b in zip(first.net.state_dict().values(), second.net.state_dict().values()):
        assert torch.equal(a, b)


def test_training_is_seeded_learns_and_survives_a_reset():
    config = {"epochs": 12, "batch_size": 1, "rank": 16, "lr": 1e-2}
    first = create_editor("mend", tiny_llava(seed=2), config)
    report = first.train(EXAMPLES, progress=False)
    again = create_editor("mend", tiny_llava(seed=2), config)
    assert {k: v for k, v in again.train(EXAMPLES, progress=False).items() if k != "seconds"} == {
        k: v for k, v in report.items() if k != "seconds"
    }
    for (name, a), b in zip(first.net.state_dict().items(), again.net.state_dict().values()):
        assert torch.equal(a, b), name
    # Random tiny models cannot generalise to other images, so the edit itself shows the learning.
    assert report["loss"] < report["loss_first_epoch"] - 0.3
    assert edit_success(first, [example.edit for example in EXAMPLES]) >= 0.9
    # The learned step sizes moved away from their initial value (the config's edit_lr).
    initial = math.log(first.config.edit_lr)
    assert all(abs(g.log_lr.item() - initial) > 0.01 for g in first.net)
    first.apply(EDITS[0])
    first.reset()
    assert first.report == report and first.weight_change() == 0.0
    assert first.apply(EDITS[0]).applied

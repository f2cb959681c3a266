"""KE: the conditioned update's form, conditioning on the edit text, training."""

import pytest
import torch

from editors import EditRequest, create_editor
from editors.hypernet import NotTrainedError
from editors.ke import ConditionedParameter
from tests.editors.test_mend import EDITS, EXAMPLES
from tests.tiny_models import tiny_llava
from monitor.metrics import token_accuracy
from monitor.probes import edit_success


def test_the_update_is_a_shaped_gradient_with_bounded_norm():
    torch.manual_seed(0)
    layer = ConditionedParameter(torch.Size((5, 8)), condition=6, hidden=7, max_scale=3.0)
    c, grad = torch.randn(6), torch.randn(5, 8) * 1e-3
    # Untrained: a normalised gradient-descent step of half the largest norm.
    torch.testing.assert_close(layer(c, grad), -1.5 * grad / grad.norm())
    for param in layer.parameters():
        param.data.normal_()
    update = layer(c, grad)
    col_a, row_a, col_b, row_b, eta = layer.conditioner(c).split([8, 5, 8, 5, 1])
    grad = grad / grad.pow(2).mean().sqrt()
    direction = grad * torch.outer(row_a.softmax(-1), col_a) + torch.outer(row_b.softmax(-1), col_b)
    expected = -3.0 * eta.sigmoid() * direction / direction.norm()
    torch.testing.assert_close(update, expected)
    assert update.norm().item() <= 3.0 and update.norm().item() == pytest.approx(3.0 * eta.sigmoid().item(), rel=1e-5)


def test_the_condition_reads_question_old_and_new_answer():
    editor = create_editor("ke", tiny_llava(seed=2))
    edit = EDITS[0]
    base = editor._condition(edit)
    for changed in (EditRequest(edit.prompt, "Paris", edit.image, edit.ground_truth),
                    EditRequest(edit.prompt, edit.target, edit.image, None),
                    EditRequest("describe the image", edit.target, edit.image, edit.ground_truth)):
        assert not torch.allclose(editor._condition(changed), base)
    assert torch.equal(editor._condition(EditRequest(edit.prompt, edit.target, None, edit.ground_truth)), base)


def test_untrained_ke_refuses_to_edit_and_training_learns():
    editor = create_editor("ke", tiny_llava(seed=2), {"epochs": 12, "batch_size": 1, "lr": 1e-2})
    with pytest.raises(NotTrainedError, match="simulate train-editor --method ke"):
        editor.apply(EDITS[0])
    report = editor.train(EXAMPLES, progress=False)
    assert report["loss"] < report["loss_first_epoch"]
    assert edit_success(editor, [example.edit for example in EXAMPLES]) >= 0.9
    outcome = editor.apply(EDITS[0])
    assert outcome.applied and all(v <= editor.config.max_scale + 1e-4 for v in outcome.changed.values())
    assert token_accuracy(editor.score([EDITS[0].query])[0]) >= 2 / 3

"""pykernels.patch on the two end-to-end models (bench/models.py) and on its own corner cases, on CPU: the
same outputs and gradients before and after, the very same Parameter objects (an optimizer made before the
call keeps training the model), unchanged state_dict keys, subclasses of the torch modules left alone."""
from __future__ import annotations

import copy

import pytest
import torch

import pykernels
from bench import models
from conftest import require_backend

SWAPPED = (torch.nn.MultiheadAttention, torch.nn.LSTM, torch.nn.LSTMCell, torch.nn.CrossEntropyLoss)
TINY = {"lstm": (models.CharLSTM, models.CharLSTMConfig(embed=16, hidden=24, layers=2)),
        "gpt": (models.GPT, models.GPTConfig(seq=16, embed=32, heads=4, layers=2))}


def _model(name):
    torch.manual_seed(0)
    cls, cfg = TINY[name]
    return cls(cfg)


def _batch(seed=0):
    return next(models.batches(models.corpus(), 3, 16, seed, torch.device("cpu")))


def _loss_and_grads(model, x, t):
    model.zero_grad(set_to_none=True)
    loss = model(x, t)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(TINY))
def test_round_trip(name):
    model = _model(name)
    x, t = _batch()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # made before patch(): must keep training the model
    loss0, grads0 = _loss_and_grads(model, x, t)

    assert pykernels.patch(model) is model
    assert not [n for n, m in model.named_modules() if type(m) in SWAPPED]  # every supported module swapped
    assert sum(type(m).__module__.startswith("pykernels.") for m in model.modules()) >= 2
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    loss1, grads1 = _loss_and_grads(model, x, t)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for n, g in grads0.items():
        torch.testing.assert_close(grads1[n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(copy.deepcopy(model)(x, t).detach(), loss1)  # adopted modules copy like torch's

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # the old optimizer trains it
    assert model(x, t) < loss1


def test_gpt_tied_head_stays_tied_and_patch_is_idempotent():
    model = pykernels.patch(_model("gpt"))
    assert model.tok.weight.data_ptr() == dict(model.named_parameters())["tok.weight"].data_ptr()
    swapped = [m for m in model.modules() if type(m).__module__.startswith("pykernels.")]
    pykernels.patch(model)
    assert [m for m in model.modules() if type(m).__module__.startswith("pykernels.")] == swapped
    assert swapped and all(m.backend is None for m in swapped)
    pykernels.patch(model, backend="reference")  # a second patch's backend reaches the modules the first made
    assert [m for m in model.modules() if type(m).__module__.startswith("pykernels.")] == swapped
    assert all(m.backend == "reference" for m in swapped)
    assert pykernels.patch(pykernels.nn.LSTMCell(2, 3), backend="reference").backend == "reference"


def test_subclasses_shared_modules_and_extras():
    class MyLoss(torch.nn.CrossEntropyLoss):  # a user's subclass may change forward: never swapped
        def forward(self, x, t):
            return 2 * super().forward(x, t)

    cell = torch.nn.LSTMCell(4, 5)
    m = torch.nn.ModuleDict({"a": cell, "b": cell, "mine": MyLoss(), "ce": torch.nn.CrossEntropyLoss()})
    hook_calls = []
    m["ce"].register_forward_hook(lambda *a: hook_calls.append(1))
    handle = m["ce"].register_forward_pre_hook(lambda *a: hook_calls.append(0))
    pykernels.patch(m, backend="reference")
    assert type(m["mine"]) is MyLoss
    assert type(m["a"]) is pykernels.nn.LSTMCell and m["a"] is m["b"] and m["a"].backend == "reference"
    assert m["a"].weight_ih is cell.weight_ih
    m["ce"](torch.randn(2, 3), torch.tensor([0, 2]))
    assert hook_calls == [0, 1] and pykernels.last_dispatch["cross_entropy"][0] == "reference"
    handle.remove()  # a handle from before the swap still removes its hook
    m["ce"](torch.randn(2, 3), torch.tensor([0, 2]))
    assert hook_calls == [0, 1, 1]
    top = pykernels.patch(torch.nn.LSTM(3, 4))  # the model itself is supported: its replacement is returned
    assert type(top) is pykernels.nn.LSTM
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        pykernels.patch("model")
    with pytest.raises(TypeError, match="module must be exactly a torch.nn.modules.rnn.LSTM"):
        pykernels.nn.LSTM.from_torch(torch.nn.GRU(3, 4))


def test_from_torch_refuses_subclasses_and_parametrized_modules():
    """As patch: a subclass may override forward, and a parametrized module's weights are properties of a generated
    subclass; rebuilt as the pykernels class, the override was dropped and the LSTM ran on a stale weight."""
    class MyCE(torch.nn.CrossEntropyLoss):
        def forward(self, x, t):
            return 10 * super().forward(x, t)
    lstm = torch.nn.utils.parametrizations.weight_norm(torch.nn.LSTM(3, 4), "weight_hh_l0")
    for cls, module in ((pykernels.nn.CrossEntropyLoss, MyCE()), (pykernels.nn.LSTM, lstm)):
        with pytest.raises(TypeError, match="subclasses and parametrized modules are not converted"):
            cls.from_torch(module)
    ours = pykernels.nn.LSTM(3, 4)
    assert type(pykernels.nn.LSTM.from_torch(ours)) is pykernels.nn.LSTM  # (a pykernels module: still fine)


def test_from_torch_shares_objects_not_containers_and_takes_the_new_extras():
    """adopt(): the same buffer objects, but copied containers (a hook, a buffer or a rebinding on the new module
    stays off the old one); the extras given are set, also when converting a pykernels module (whose own extras are
    left as they were); a misspelt backend fails at the conversion."""
    x, t = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    theirs = torch.nn.CrossEntropyLoss(weight=torch.rand(5, dtype=torch.float64) + 0.5)
    ours = pykernels.nn.CrossEntropyLoss.from_torch(theirs, backend="reference")
    assert ours.weight is theirs.weight
    calls = []
    ours.register_forward_hook(lambda *a: calls.append("ours"))
    ours.register_buffer("extra", torch.zeros(1))
    theirs(x, t)
    assert calls == [] and "extra" not in theirs.state_dict()
    ours.weight = None
    assert theirs.weight is not None
    first = pykernels.nn.CrossEntropyLoss(z_loss=0.5, backend="reference")
    again = pykernels.nn.CrossEntropyLoss.from_torch(first, z_loss=0.25, backend="cpu")
    assert (again.z_loss, again.backend) == (0.25, "cpu") and (first.z_loss, first.backend) == (0.5, "reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        pykernels.nn.CrossEntropyLoss.from_torch(torch.nn.CrossEntropyLoss(), backend="refrence")
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        with pytest.raises(ValueError, match="backend must be one of"):
            pykernels.nn.LinearCrossEntropyLoss.from_torch(torch.nn.LinearCrossEntropyLoss(4, 5), backend="refrence")


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="torch < 2.13 has no such module")
def test_linear_cross_entropy_loss_is_swapped_too():
    torch.manual_seed(0)
    head = torch.nn.ModuleDict({"loss": torch.nn.LinearCrossEntropyLoss(8, 11, bias=True, label_smoothing=0.1)})
    x, t = torch.randn(5, 8), torch.randint(0, 11, (5,))
    weight = head["loss"].linear.weight
    before = head["loss"](x, t)
    before.backward()
    grad, weight.grad = weight.grad.clone(), None
    pykernels.patch(head)
    assert type(head["loss"]) is pykernels.nn.LinearCrossEntropyLoss and head["loss"].linear.weight is weight
    after = head["loss"](x, t)
    after.backward()
    torch.testing.assert_close(after, before)
    torch.testing.assert_close(weight.grad, grad)


@pytest.mark.parametrize("name", list(TINY))
def test_round_trip_on_the_triton_kernels(name):
    """patch(model, backend="triton"): every swapped module runs the Triton kernels (under the interpreter on
    CPU), with the same loss and gradients as the torch modules."""
    require_backend("triton", "cpu")
    model = _model(name)
    x, t = _batch()
    loss0, grads0 = _loss_and_grads(model, x, t)
    pykernels.patch(model, backend="triton")
    pykernels.last_dispatch.clear()
    loss1, grads1 = _loss_and_grads(model, x, t)
    ran = {op: pykernels.last_dispatch[op][0] for op in ("cross_entropy", "lstm", "scaled_dot_product_attention")
           if op in pykernels.last_dispatch}
    assert ran["cross_entropy"] == ran["lstm" if name == "lstm" else "scaled_dot_product_attention"] == "triton"
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for n, g in grads0.items():
        torch.testing.assert_close(grads1[n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_module_compiled_in_place_runs_the_replacement(monkeypatch):
    """Module.compile() stores a compiled callable over the old module's forward: the replacement must not keep
    running torch's (it is compiled again, with a warning that the options were not carried over)."""
    import pykernels.nn.attention as nn_attention
    torch._dynamo.reset()
    mha = torch.nn.MultiheadAttention(8, 2)
    mha.compile(backend="eager")
    with pytest.warns(UserWarning, match="compiled in place"):
        ours = pykernels.nn.MultiheadAttention.from_torch(mha, backend="reference")
    calls = []  # (last_dispatch records eager calls only: count the traces of our functional instead)
    sdpa = nn_attention.scaled_dot_product_attention
    monkeypatch.setattr(nn_attention, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    x = torch.randn(3, 2, 8)
    ours(x, x, x, need_weights=False)
    assert calls and ours._compiled_call_impl is not None


def test_repatch_without_backend_keeps_the_earlier_one():
    """patch(model) with no backend leaves the backend an earlier patch(model, backend=...) gave (the docstring:
    modules already patched take ``backend`` only when one is given)."""
    model = torch.nn.Sequential(torch.nn.LSTMCell(2, 3))
    pykernels.patch(model, backend="reference")
    pykernels.patch(model)
    assert model[0].backend == "reference"

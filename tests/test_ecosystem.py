"""What users put around a model keeps working after `transform`: hooks, KV-cache generate, activation
checkpointing, PEFT, dtype moves and autocast, saving and loading, the model's own methods, Trainer, hidden states,
wrappers. (FSDP2 is in test_distributed.py.)"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import zoo

import attnres_fx


@pytest.fixture(scope="module")
def llama_pair():
    """(an untransformed copy, the transformed model)."""
    model = zoo.llama()
    original = copy.deepcopy(model)
    return original, attnres_fx.transform(model)


# --- hooks ---------------------------------------------------------------------------------------------------------


def test_submodule_hooks_fire_on_every_call_whether_registered_before_or_after_transform() -> None:
    model = zoo.llama()
    fired = []
    before = model.model.layers[1].mlp.register_forward_pre_hook(lambda *a: fired.append("pre, before"))
    tmodel = attnres_fx.transform(model)
    fired.clear()  # transform ran the example once, to capture it: hooks present then fired then
    after = tmodel.model.layers[1].mlp.register_forward_hook(lambda *a: fired.append("post, after"))
    backward = tmodel.model.layers[2].register_full_backward_hook(lambda *a: fired.append("backward"))
    ids = zoo.token_ids()
    for _ in range(2):
        tmodel(input_ids=ids).logits.sum().backward()
    assert fired == ["pre, before", "post, after", "backward"] * 2
    for handle in (before, after, backward):
        handle.remove()
    tmodel(input_ids=ids).logits.sum().backward()
    assert len(fired) == 6


def test_hooks_on_a_layer_see_the_depth_mix_it_reads(llama_pair) -> None:
    """A layer's input is the mix its first sublayer reads: at zero init the stream over its number of sources."""
    original, tmodel = llama_pair
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.model.layers[2].register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0]))
        for name, m in (("original", original), ("transformed", tmodel))
    ]
    ids = zoo.token_ids()
    with torch.no_grad():
        original(input_ids=ids), tmodel(input_ids=ids)
    for h in handles:
        h.remove()
    sources = attnres_fx.plan(tmodel).sites[4].num_sources  # layer 2's first sublayer
    torch.testing.assert_close(seen["transformed"] * sources, seen["original"], rtol=1e-4, atol=1e-4)


# --- generation ----------------------------------------------------------------------------------------------------

GENERATORS = {
    "llama": zoo.llama,
    "gpt2": zoo.gpt2,
    "qwen3_moe": zoo.qwen3_moe,
    "kimi_linear": zoo.kimi_linear,
}


@pytest.mark.parametrize("arch", list(GENERATORS))
def test_generate_uses_the_models_kv_cache(arch: str) -> None:
    model = GENERATORS[arch](layers=2)
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model)
    prompt = zoo.token_ids(2, 6, seed=4)
    greedy = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(tmodel.generate(prompt, **greedy), original.generate(prompt, **greedy))
        zoo.random_depth_(tmodel, 0.5, 7)
        cached = tmodel.generate(prompt, **greedy)
        tokens, done = prompt, torch.zeros(len(prompt), 1, dtype=torch.bool)
        for _ in range(16):  # step by step, recomputing the whole sequence without a cache; padded after EOS
            logits = tmodel(input_ids=tokens, use_cache=False).logits[:, -1]
            next_token = logits.argmax(-1, keepdim=True).masked_fill(done, 0)
            tokens, done = torch.cat([tokens, next_token], dim=1), done | (next_token == model.config.eos_token_id)
    assert torch.equal(cached, tokens)
    assert not torch.equal(cached, original.generate(prompt, **greedy))  # the queries do change the model


# --- activation checkpointing --------------------------------------------------------------------------------------


def saved_bytes_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes the training forward keeps for the backward (parameters excluded) and the gradients."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params), grads


@pytest.mark.parametrize("how", ["hf after transform", "hf before transform", "apply_activation_checkpointing"])
def test_activation_checkpointing_cuts_saved_bytes_with_the_same_gradients(how: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    ids = zoo.token_ids(2, 32)
    base = zoo.llama().train()
    plain = zoo.random_depth_(attnres_fx.transform(copy.deepcopy(base)).train(), 0.5, 7)
    model = copy.deepcopy(base)
    if how == "hf before transform":
        model.gradient_checkpointing_enable()
    tmodel = attnres_fx.transform(model).train()
    tmodel.attnres.load_state_dict(plain.attnres.state_dict())
    if how == "hf after transform":
        tmodel.gradient_checkpointing_enable()
    elif how == "apply_activation_checkpointing":
        layer_type = type(tmodel.model.layers[0])
        apply_activation_checkpointing(tmodel, check_fn=lambda m: isinstance(m, layer_type))
    saved_plain, grads_plain = saved_bytes_and_grads(plain, ids)
    saved, grads = saved_bytes_and_grads(tmodel, ids)
    assert saved < 0.4 * saved_plain  # the original goes 1.21 -> 0.15 MB here
    assert grads.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        assert zoo.rel_err(grads[name], grad) < 1e-6, name


def test_checkpointed_recomputation_belongs_to_its_own_call() -> None:
    """Two forwards, then their backwards in reverse order: each recomputes its own layers' inputs."""
    ids_a, ids_b = zoo.token_ids(2, 16, seed=1), zoo.token_ids(2, 16, seed=2)
    plain = zoo.random_depth_(attnres_fx.transform(zoo.llama()).train(), 0.5, 7)
    expected = []
    for ids in (ids_a, ids_b):
        plain.zero_grad()
        plain(input_ids=ids, labels=ids).loss.backward()
        expected.append(plain.attnres.site_3.query.grad.clone())
    tmodel = copy.deepcopy(plain)
    tmodel.gradient_checkpointing_enable()
    loss_a = tmodel(input_ids=ids_a, labels=ids_a).loss
    loss_b = tmodel(input_ids=ids_b, labels=ids_b).loss
    tmodel.zero_grad()
    loss_b.backward()
    torch.testing.assert_close(tmodel.attnres.site_3.query.grad, expected[1])
    tmodel.zero_grad()
    loss_a.backward()
    torch.testing.assert_close(tmodel.attnres.site_3.query.grad, expected[0])


def test_nothing_of_a_call_outlives_its_backward() -> None:
    """The depth state rides on the tensors between layers (and their autograd nodes, for the copies offloading hands a
    recomputation): it lives exactly as long as the backward needs it."""
    import gc
    import weakref

    from attnres_fx import state

    tmodel = attnres_fx.transform(zoo.llama()).train()
    tmodel.gradient_checkpointing_enable()
    held: list[weakref.ref] = []

    def keep_refs(module, args, output):
        depth = state.find(output, state.DEPTH)
        scores = [t for s in depth.scores.values() for t in (s.stats.m, s.stats.l, *s.stats.rows, s.stats.weight)]
        held.extend(weakref.ref(x) for x in (depth, *depth.blocks, *scores))

    hooks = [layer.register_forward_hook(keep_refs) for layer in tmodel.model.layers[:-1]]
    ids = zoo.token_ids()
    with torch.autograd.graph.save_on_cpu():  # the recomputation is handed copies
        loss = tmodel(input_ids=ids, labels=ids).loss
    for h in hooks:
        h.remove()
    gc.collect()
    assert held and all(ref() is not None for ref in held)
    loss.backward()
    del loss
    gc.collect()
    assert all(ref() is None for ref in held)


def test_concurrent_calls_on_two_threads_keep_their_own_state(llama_pair) -> None:
    import threading

    _, tmodel = llama_pair
    inputs = [zoo.token_ids(2, 16, seed=s) for s in (11, 12)]
    with torch.no_grad():
        expected = [tmodel(input_ids=ids).logits for ids in inputs]
        results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

        def work(k: int) -> None:
            with torch.no_grad():  # grad mode is per thread
                for _ in range(20):
                    results[k].append(tmodel(input_ids=inputs[k]).logits)

        threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for k in (0, 1):
        assert len(results[k]) == 20 and all(torch.equal(r, expected[k]) for r in results[k])


# --- PEFT ----------------------------------------------------------------------------------------------------------


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)


@pytest.mark.parametrize("order", ["peft after transform", "peft before transform"])
def test_lora_changes_the_output_and_trains(order: str) -> None:
    from peft import get_peft_model

    ids = zoo.token_ids()
    if order == "peft after transform":
        tmodel = attnres_fx.transform(zoo.llama())
        without_lora = tmodel(input_ids=ids).logits.detach()
        peft_model = get_peft_model(tmodel, lora_config())
    else:
        peft_model = get_peft_model(zoo.llama(), lora_config())
        with peft_model.disable_adapter(), torch.no_grad():
            without_lora = peft_model(input_ids=ids).logits
        peft_model = attnres_fx.transform(peft_model)
    assert attnres_fx.plan(peft_model).sites
    assert (peft_model(input_ids=ids).logits - without_lora).abs().max() > 1e-2
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    # documented: PEFT freezes what exists when it wraps; attnres.* added later is trainable
    assert lora and (trainable == lora) == (order == "peft after transform")
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in lora)
    with torch.no_grad():
        assert peft_model.generate(input_ids=ids[:, :4], max_new_tokens=4, do_sample=False).shape == (2, 8)


# --- dtype, autocast, grad mode ------------------------------------------------------------------------------------


def test_dtype_moves_and_autocast_in_any_order_with_any_call_form(llama_pair) -> None:
    _, tmodel = llama_pair
    tmodel = copy.deepcopy(tmodel)
    ids = zoo.token_ids()
    calls = [lambda: tmodel(input_ids=ids), lambda: tmodel(ids), lambda: tmodel(input_ids=ids, labels=ids)]
    for call in calls:  # each call form used in fp32 first, then again after every change
        assert call().logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(call().logits.dtype == torch.bfloat16 for call in calls)
    tmodel.to(torch.bfloat16)
    assert {p.dtype for p in tmodel.parameters()} == {torch.bfloat16}
    assert all(call().logits.dtype == torch.bfloat16 for call in calls)
    weights = attnres_fx.depth_weights(tmodel, input_ids=ids)
    assert all(w.dtype == torch.float32 for w in weights.values())  # softmax statistics stay fp32
    tmodel.half()
    assert all(call().logits.dtype == torch.float16 for call in calls)
    tmodel.float()
    assert all(call().logits.dtype == torch.float32 for call in calls)


def test_a_failing_call_leaves_grad_mode_as_it_was(llama_pair) -> None:
    _, tmodel = llama_pair
    with pytest.raises(attnres_fx.AttnResError, match="called with a stream input that carries no depth state"):
        tmodel.model.layers[2](torch.randn(2, 16, 64))
    with pytest.raises(Exception):
        tmodel(input_ids=torch.randn(2, 16))
    assert torch.is_grad_enabled()
    assert tmodel(input_ids=zoo.token_ids()).logits.shape == (2, 16, zoo.VOCAB)


# --- saving and loading --------------------------------------------------------------------------------------------


def test_torch_save_pickle_and_deepcopy_keep_the_transformed_model(llama_pair) -> None:
    _, tmodel = llama_pair
    tmodel = zoo.random_depth_(copy.deepcopy(tmodel), 0.5, 7)
    ids = zoo.token_ids()
    expected = tmodel(input_ids=ids).logits
    buffer = io.BytesIO()
    torch.save(tmodel, buffer)
    buffer.seek(0)
    copies = [torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(tmodel)), copy.deepcopy(tmodel)]
    for other in copies:
        torch.testing.assert_close(other(input_ids=ids).logits, expected)
        with torch.no_grad():  # each copy has its own parameters, read by its own hooks
            other.attnres.final.query.zero_()
        assert not torch.allclose(other(input_ids=ids).logits, expected)
    torch.testing.assert_close(tmodel(input_ids=ids).logits, expected)


def test_save_pretrained_then_from_pretrained_round_trips_and_other_settings_are_refused(tmp_path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tmodel = zoo.random_depth_(attnres_fx.transform(zoo.llama(), block_size=2), 0.5, 7)
    tmodel.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.weight" in saved and "attnres.site_1.query" in saved
    loaded = attnres_fx.from_pretrained(AutoModelForCausalLM, tmp_path)
    assert attnres_fx.plan(loaded).block_size == 2
    ids = zoo.token_ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, tmodel(input_ids=ids).logits)
    other = attnres_fx.transform(zoo.llama(), block_size=4)
    with pytest.raises(
        attnres_fx.AttnResError, match="block_size 2 over 8 sublayers; this model was transformed with block_size 4"
    ):
        other.load_state_dict(saved)


# --- the model's own methods, Trainer, hidden states, wrappers -----------------------------------------------------


def test_the_models_own_methods_run_through_its_modules(llama_pair) -> None:
    original, tmodel = llama_pair
    new = sum(p.numel() for p in tmodel.attnres.parameters())
    assert tmodel.num_parameters() == original.num_parameters() + new
    assert tmodel.get_input_embeddings() is tmodel.model.embed_tokens
    resized = copy.deepcopy(tmodel)
    resized.resize_token_embeddings(zoo.VOCAB + 8)
    assert resized(input_ids=zoo.token_ids()).logits.shape[-1] == zoo.VOCAB + 8


def test_trainer_runs_steps_on_the_transformed_model(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    tmodel = zoo.random_depth_(attnres_fx.transform(zoo.llama()).train(), 0.5, 7)
    before = tmodel.attnres.site_2.query.detach().clone()
    data = [{"input_ids": ids, "labels": ids} for ids in zoo.token_ids(8, 16, seed=9)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-2,
    )
    result = Trainer(model=tmodel, args=args, train_dataset=data).train()
    assert result.global_step == 3
    assert not torch.equal(tmodel.attnres.site_2.query, before)


def test_output_hidden_states_are_the_mixes_each_layer_reads(llama_pair) -> None:
    """Documented: hidden_states[0] is the embedding, hidden_states[i] the depth mix layer i's first sublayer reads
    (at zero init, the original's hidden state over that sublayer's number of sources), the last is final-normed."""
    original, tmodel = llama_pair
    ids = zoo.token_ids()
    with torch.no_grad():
        mine = tmodel(input_ids=ids, output_hidden_states=True).hidden_states
        theirs = original(input_ids=ids, output_hidden_states=True).hidden_states
    sites = attnres_fx.plan(tmodel).sites
    assert len(mine) == len(theirs) == 5
    for i in range(4):
        torch.testing.assert_close(mine[i] * sites[2 * i].num_sources, theirs[i], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mine[4], theirs[4], rtol=1e-3, atol=1e-3)


def test_a_compiled_model_is_transformed_through_its_wrapper() -> None:
    model = zoo.llama()
    original = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    assert attnres_fx.transform(compiled) is compiled
    assert set(model.state_dict()) - set(original.state_dict()) == {k for k in model.state_dict() if "attnres" in k}
    ids = zoo.token_ids()
    torch.testing.assert_close(compiled(input_ids=ids).logits, original(input_ids=ids).logits, rtol=1e-3, atol=1e-3)
    zoo.random_depth_(model, 0.5, 7)  # the wrapper runs the depth attention: it follows the pseudo-queries
    with torch.no_grad():
        logits = compiled(input_ids=ids).logits
        torch.testing.assert_close(logits, model(input_ids=ids).logits)
        assert zoo.rel_err(logits, original(input_ids=ids).logits) > 1e-2

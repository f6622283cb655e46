"""GSPO rollouts through an inference server over HTTP, for real on 127.0.0.1: our model server (uvicorn in a
thread, or the subprocess a GSPO run starts itself) speaking the token-in/token-out `/v1/completions`
protocol, with image and Slow/Fast video inputs; the server-input check failing on a field sent wrong; weight
sync (export + `/update_weights_from_disk`) moving the server's log-probs to the trainer's; and GSPO over
HTTP training exactly as in process (same rewards, hint levels, losses and parameters)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from test_rl import IMAGE_ITEM, TEXT_ITEMS, VIDEO_AND_IMAGE, letter_reward, media_lookup, stage

from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.export import export_model
from keyeflow.model.generation import GenerationServerError, LocalGenerator
from keyeflow.model.rollout_protocol import HTTPRolloutGenerator, reload_weights
from keyeflow.model.serving import create_app
from keyeflow.training import distributed
from keyeflow.training.config import RolloutServerConfig
from keyeflow.training.rl import (
    completion_features,
    completion_logprobs,
    pass_rate_filter,
    rejection_sampling_round,
    train_gspo,
    trainer_logprobs,
    vision_pad_ids,
)
from keyeflow.training.rollout import (
    RolloutInputMismatch,
    RolloutServer,
    WeightSyncError,
    check_served_inputs,
    check_served_logprobs,
    logprob_tolerance,
)

SERVED = "policy"


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    from keyeflow.model.config import tiny
    from keyeflow.model.modeling import KeyeForConditionalGeneration
    from keyeflow.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-policy")
    KeyeForConditionalGeneration(tiny(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class ThreadServer:
    """`create_app` under a real uvicorn server in a thread, on a free 127.0.0.1 port."""

    def __init__(self, generator: LocalGenerator | None, *, weight_reload: bool = True, app=None):
        app = app if app is not None else create_app(generator, SERVED, weight_reload=weight_reload)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.root = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.url = f"{self.root}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def sampler_for(url: str, generator: LocalGenerator) -> HTTPRolloutGenerator:
    return HTTPRolloutGenerator(
        url, SERVED, encode_prompt=generator.encode_prompt, tokenizer=generator.tokenizer,
        stop_token_ids=sorted(generator.stop_token_ids), timeout=60, max_retries=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def local(init_dir) -> LocalGenerator:
    return LocalGenerator(init_dir, media_lookup=media_lookup)


@pytest.fixture(scope="module")
def served(init_dir):
    with ThreadServer(LocalGenerator(init_dir)) as server:  # the server has no media lookup: pixels come in
        yield server


def test_http_rollouts_are_the_in_process_rollouts_with_image_and_video(served, local):
    sampler = sampler_for(served.url, local)
    conversations = [TEXT_ITEMS[0]["messages"], IMAGE_ITEM["messages"], VIDEO_AND_IMAGE]
    args = {"n": 3, "max_new_tokens": 10, "temperature": 1.0, "seed": 11, "logprobs": True}
    got, expected = sampler.generate(conversations, **args), local.generate(conversations, **args)
    for got_group, expected_group in zip(got, expected):
        assert len({tuple(c.token_ids) for c in got_group}) > 1  # sampled, not one answer repeated
        for g, e in zip(got_group, expected_group):
            assert g.token_ids == e.token_ids and g.text == e.text and g.finish_reason == e.finish_reason
            assert g.token_logprobs == pytest.approx(e.token_logprobs, abs=1e-5)
    # The request carries the trainer's prompt ids and the image/video patches, and the server rebuilds
    # exactly the trainer's inputs from it (3D positions included).
    request = sampler.request(VIDEO_AND_IMAGE, n=1, max_new_tokens=1, temperature=0.0, seed=0)
    prompt = local.encode_prompt(VIDEO_AND_IMAGE)
    assert request["prompt"] == prompt.input_ids.tolist()
    assert request["multi_modal_data"]["grid_thw"] == [[1, 4, 4], [1, 2, 4], [1, 4, 4], [1, 4, 6]]
    check_served_inputs(request, prompt, local.model.config)
    # vLLM's spelling of the ids, and errors a client must see.
    body = dict(request, return_token_ids=False, logprobs=0)
    reply = httpx.post(f"{served.url}/completions", json=body, timeout=60).json()
    assert reply["choices"][0]["logprobs"]["tokens"][0].startswith("token_id:")
    assert "token_ids" not in reply["choices"][0]
    bad = httpx.post(f"{served.url}/completions", json=dict(body, prompt=body["prompt"][:-30]), timeout=60)
    assert bad.status_code == 400 and "pad tokens" in bad.json()["error"]["message"]


def test_the_served_input_check_names_the_field_sent_wrong(served, local):
    sampler = sampler_for(served.url, local)
    request = sampler.request(VIDEO_AND_IMAGE, n=1, max_new_tokens=1, temperature=0.0, seed=0)
    prompt = local.encode_prompt(VIDEO_AND_IMAGE)
    config = local.model.config

    # A grid with the same number of patches, transposed (6 × 4 for 4 × 6): the server sees another image.
    grids = [list(g) for g in request["multi_modal_data"]["grid_thw"]]
    grids[3] = [1, 6, 4]
    wrong = dict(request, multi_modal_data=dict(request["multi_modal_data"], grid_thw=grids))
    with pytest.raises(RolloutInputMismatch, match=r"grid_thw at \(3, 1\)") as error:
        check_served_inputs(wrong, prompt, config)
    assert error.value.field == "grid_thw"

    # One patch byte changed in transit.
    trainer_pixels = prompt.pixel_values.clone()
    trainer_pixels[5, 7] ^= 1
    changed = dataclasses.replace(prompt, pixel_values=trainer_pixels)
    with pytest.raises(RolloutInputMismatch, match=r"pixel_values at \(5, 7\)"):
        check_served_inputs(request, changed, config)

    # A prompt token sent as another id.
    ids = list(request["prompt"])
    ids[2] = ids[2] + 1
    with pytest.raises(RolloutInputMismatch, match=r"input_ids at \(2,\)"):
        check_served_inputs(dict(request, prompt=ids), prompt, config)


def test_weight_sync_moves_the_servers_logprobs_to_the_trainers(init_dir, local, tmp_path):
    """A policy update, then sync: the server's log-probs for the fixed prompt change and equal the trainer's;
    before the sync the check fails, naming both numbers."""
    policy = LocalGenerator(init_dir, media_lookup=media_lookup)
    model = policy.model
    config = RolloutServerConfig(url="http://placeholder/v1", served_model_name=SERVED, sync_dtype="fp32")
    with ThreadServer(LocalGenerator(init_dir)) as thread:
        config = dataclasses.replace(config, url=thread.url)
        server = RolloutServer(
            config, policy, tmp_path, distributed.setup(), lambda p, ids: trainer_logprobs(model, p, ids),
            IMAGE_ITEM["messages"], vision_pad_ids(model),
        )  # fmt: skip
        before = server.open(model, 0)
        first = server.last_check
        assert before["sync_logprob_gap"] <= logprob_tolerance("http", "fp32")

        # A real policy update: one SGD step raising the log-probs of the check completion.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        prompt = policy.encode_prompt(IMAGE_ITEM["messages"])
        logps, mask = completion_logprobs(model, [completion_features(prompt, first["token_ids"])])
        loss = -(logps * mask).sum()
        loss.backward()
        optimizer.step()

        with pytest.raises(WeightSyncError, match=r"server -?\d+\.\d+, trainer -?\d+\.\d+"):
            check_served_logprobs(
                server.sampler, policy.encode_prompt, IMAGE_ITEM["messages"],
                lambda p, ids: trainer_logprobs(model, p, ids), logprob_tolerance("http", "fp32"),
            )  # fmt: skip
        after = server.sync(model, 1)
        second = server.last_check
        assert after["sync_logprob_gap"] <= logprob_tolerance("http", "fp32")
        changed = [abs(a - b) for a, b in zip(first["server_logprobs"], second["server_logprobs"])]
        assert max(changed) > 1e-2  # the server's numbers moved with the update …
        assert second["server_logprobs"] == pytest.approx(second["trainer_logprobs"], abs=1e-5)  # … to ours
        assert sorted(p.name for p in (tmp_path / "rollout_weights").iterdir()) == ["step-00000001"]

        # The reload path refuses what it cannot load, and is off unless enabled.
        with pytest.raises(GenerationServerError, match="could not load"):
            reload_weights(thread.url, str(tmp_path / "nothing-here"))
    with (
        ThreadServer(LocalGenerator(init_dir), weight_reload=False) as closed,
        pytest.raises(GenerationServerError, match="HTTP 404"),
    ):
        reload_weights(closed.url, str(init_dir))


def test_bf16_sync_meets_its_own_tolerance_not_fp32s(init_dir, local, tmp_path):
    """bf16-rounded weights on the server: the gap is far above fp32's 1e-5, within bf16's tolerance."""
    model = local.model
    export_model(model, local.tokenizer, tmp_path / "bf16", dtype="bf16")
    with ThreadServer(LocalGenerator(tmp_path / "bf16")) as thread:
        sampler = sampler_for(thread.url, local)

        def check(tolerance):
            return check_served_logprobs(
                sampler, local.encode_prompt, TEXT_ITEMS[0]["messages"],
                lambda p, ids: trainer_logprobs(model, p, ids), tolerance,
            )  # fmt: skip

        record = check(logprob_tolerance("http", "bf16"))
        assert record["mean_gap"] > logprob_tolerance("http", "fp32")
        with pytest.raises(WeightSyncError):
            check(logprob_tolerance("http", "fp32"))


def test_pass_rate_filter_and_rejection_sampling_are_unchanged_over_http(served, local):
    sampler = sampler_for(served.url, local)
    items = [*TEXT_ITEMS, IMAGE_ITEM]

    def reward(item, response):
        return float(len(response) % 3 == 0)

    args = {"max_new_tokens": 6, "seed": 3, "success_threshold": 0.5}
    over_http = pass_rate_filter(sampler, items, 4, reward, **args)
    in_process = pass_rate_filter(local, items, 4, reward, **args)
    assert over_http.records == in_process.records

    rows = [
        dict(item, messages=[*item["messages"], {"role": "assistant", "content": "ref"}]) for item in items
    ]
    rejection = {"verify_fn": lambda row, text: len(text) % 2 == 0, "prefer_fn": lambda a, b: len(a) > len(b)}
    assert rejection_sampling_round(sampler, rows, k=3, max_new_tokens=6, seed=5, **rejection).rows == (
        rejection_sampling_round(local, rows, k=3, max_new_tokens=6, seed=5, **rejection).rows
    )


def test_multimodal_rollouts_are_refused_by_an_engine_that_would_drop_the_pixels(local):
    """vLLM's /v1/completions takes no pixels with a token prompt and ignores unknown fields: the client asks
    who serves and refuses to send an image there (text goes through)."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": SERVED, "object": "model", "owned_by": "vllm"}]}

    with ThreadServer(None, app=app) as thread:
        sampler = sampler_for(thread.url, local)
        sampler.request(TEXT_ITEMS[0]["messages"], n=1, max_new_tokens=1, temperature=0.0, seed=0)
        with pytest.raises(ValueError, match="served by 'vllm'.*takes no pixels"):
            sampler.request(IMAGE_ITEM["messages"], n=1, max_new_tokens=1, temperature=0.0, seed=0)


@pytest.mark.slow  # starts the server subprocess and trains twice (~20-30 s)
def test_gspo_over_http_trains_as_in_process(init_dir, tmp_path):
    """The run starts our server itself, syncs fp32 weights after every step: same rollouts, rewards, hint
    levels, losses, and the same parameters after each of two steps."""
    items = [
        *TEXT_ITEMS,
        dict(IMAGE_ITEM, hints={"1": "It is an animal.", "2": "It says meow.", "3": "A cat."}),
    ]

    def reward(item, response: str) -> float:
        # The picture fails until its level-2 hint is in the prompt: hint sampling runs over HTTP too.
        if item["id"] == "picture" and "meow" not in str(item["messages"][-1]["content"]):
            return 0.0
        return letter_reward(item, response)

    runs = {}
    for name, server in (("local", None), ("http", RolloutServerConfig(sync_dtype="fp32"))):
        config = stage(max_steps=2, rollout_server=server, checkpoint_every=1)
        runs[name] = train_gspo(
            config, init=init_dir, items=items, reward_fn=reward, out_dir=tmp_path / name,
            media_lookup=media_lookup,
        )  # fmt: skip
    local, http = runs["local"], runs["http"]
    keys = ("reward_mean", "reward_std", "pass_rate", "num_active_responses", "loss", "grad_norm")
    for a, b in zip(local.history, http.history, strict=True):
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, abs=1e-6)
        assert a["hint_levels"] == b["hint_levels"]
        assert b["sync_logprob_gap"] <= logprob_tolerance("http", "fp32")
        assert b["sampler_logprob_gap"] == pytest.approx(a["sampler_logprob_gap"], abs=1e-6)
    assert http.history[0]["hint_levels"]["picture"] == 2
    for step in (1, 2):
        want = load_keye_checkpoint(tmp_path / "local" / f"step-{step:08d}" / "model").state_dict()
        got = load_keye_checkpoint(tmp_path / "http" / f"step-{step:08d}" / "model").state_dict()
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "http" / "rollout_weights" / "server.log").exists()

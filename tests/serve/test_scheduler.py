"""The scheduler in-process: continuous batching equals one-at-a-time generation, seeds, stops, cancels."""

from __future__ import annotations

import threading
import time

import pytest

from lorakit.config import ServeConfig
from lorakit.eval.generate import GenerationSettings, generate, load_for_inference
from lorakit.serve.engine import Engine
from lorakit.serve.scheduler import Event, QueueFull, Request
from tests.serve.conftest import PROMPTS, Served


@pytest.fixture(scope="module")
def engine(served: Served):
    eng = Engine(str(served.model), list(served.adapters.items()), ServeConfig(max_batch=4, max_queue=64), "fp32")
    eng.scheduler.start()
    yield eng
    eng.scheduler.shutdown(1.0)


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.kind != "delta":
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if e.kind == "delta")


def submit(engine: Engine, model: str, prompt: str, settings: GenerationSettings) -> Sink:
    served = engine.models[model]
    sink = Sink()
    engine.scheduler.submit(Request(engine.chat_ids(served, [{"role": "user", "content": prompt}]), served.slot,
                                    served.eos, settings, sink))
    return sink


def wait_idle(engine: Engine) -> None:
    deadline = time.monotonic() + 10
    while (engine.scheduler.batch_size or engine.scheduler.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_rows_joining_and_leaving_answer_as_alone(engine: Engine, served: Served) -> None:
    base = str(served.model)
    jobs = [([base, "alpha", "beta"][i % 3], PROMPTS[(i * 5) % len(PROMPTS)], 6 + (i * 7) % 19) for i in range(15)]
    sinks = []
    for i, (model, prompt, n) in enumerate(jobs):  # arrivals spread over the decode steps
        sinks.append(submit(engine, model, prompt, GenerationSettings(max_new_tokens=n)))
        if i % 3 == 2:
            time.sleep(0.01)
    ims = {model: load_for_inference(base, served.adapters.get(model), "fp32") for model in (base, "alpha", "beta")}
    for (model, prompt, n), sink in zip(jobs, sinks):
        assert sink.done.wait(30)
        assert sink.events[-1].kind == "done"
        expected = generate(ims[model], [prompt], GenerationSettings(max_new_tokens=n))[0]  # alone, as generate does
        assert sink.text == expected, (model, prompt, n)
        assert sink.events[-1].completion_tokens <= n
    wait_idle(engine)
    assert engine.scheduler.batch_size == 0


def test_sampling_is_seeded_per_request_as_generate_is(engine: Engine, served: Served) -> None:
    settings = GenerationSettings(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=11)
    im = load_for_inference(str(served.model), served.adapters["beta"], "fp32")
    expected = generate(im, [PROMPTS[4]], settings)[0]
    sinks = [submit(engine, "beta", PROMPTS[4], settings) for _ in range(2)]
    others = [submit(engine, "alpha", p, GenerationSettings(max_new_tokens=16, temperature=1.0, seed=i))
              for i, p in enumerate(PROMPTS[:3])]
    for sink in sinks + others:
        assert sink.done.wait(30)
    assert [s.text for s in sinks] == [expected, expected]


def test_stop_strings_end_the_answer_before_them(engine: Engine, served: Served, reference) -> None:
    full = reference["alpha"][PROMPTS[2]]
    stop = full[5:7]
    sink = submit(engine, "alpha", PROMPTS[2], GenerationSettings(max_new_tokens=24, stop=[stop]))
    assert sink.done.wait(30)
    assert sink.text == full[: full.find(stop)].strip() and sink.events[-1].finish_reason == "stop"


def test_cancelled_rows_leave_and_a_full_queue_refuses(served: Served) -> None:
    eng = Engine(str(served.model), [], ServeConfig(max_batch=1, max_queue=2), "fp32")
    long = GenerationSettings(max_new_tokens=400)
    first = submit(eng, str(served.model), PROMPTS[0], long)  # not started yet: it waits in the queue
    second = submit(eng, str(served.model), PROMPTS[1], long)
    with pytest.raises(QueueFull):
        submit(eng, str(served.model), PROMPTS[2], long)
    eng.scheduler.start()
    try:
        deadline = time.monotonic() + 10
        while not first.events and time.monotonic() < deadline:
            time.sleep(0.005)
        for row in list(eng.scheduler._batch):
            row.req.cancelled = True
        for req in list(eng.scheduler._pending):
            req.cancelled = True
        assert first.done.wait(10) and second.done.wait(10)
        assert first.events[-1].kind == "error" and second.events[-1].kind == "error"
        wait_idle(eng)
        assert eng.scheduler.batch_size == 0 and eng.scheduler.queue_depth == 0
    finally:
        eng.scheduler.shutdown(1.0)


def test_a_qlora_adapter_is_served_on_its_quantized_base(served: Served, tmp_path) -> None:
    import torch

    from lorakit.adapters import inject_lora
    from lorakit.adapters.inject import lora_layers
    from lorakit.adapters.state import save_adapter
    from lorakit.errors import LorakitError
    from lorakit.models.load import load_model
    from lorakit.models.quantized import QuantSpec

    loaded = load_model(str(served.model), "fp32", with_tokenizer=False,
                        quantization=QuantSpec("nf4", 64, True, torch.float32))
    torch.manual_seed(5)
    inject_lora(loaded.model, ["all-linear"], r=4, alpha=8)
    with torch.no_grad():
        for _, layer in lora_layers(loaded.model):
            layer.lora_B.weight.normal_(0, 0.3)
    qlora = save_adapter(loaded.model, tmp_path / "qlora", str(served.model),
                         {"template": "auto", "quantization": loaded.quantization})
    eng = Engine(None, [("q", qlora)], ServeConfig(max_batch=4), "fp32")  # the base recorded by the adapter
    assert any(hasattr(m, "dequantized_weight") for m in eng.model.modules())  # NF4, as it was trained
    eng.scheduler.start()
    try:
        im = load_for_inference(None, qlora, "fp32")  # `lorakit generate --adapter`: unmerged on NF4
        settings = GenerationSettings(max_new_tokens=12)
        expected = generate(im, PROMPTS[:4], settings, batch_size=1)
        sinks = [submit(eng, "q", p, settings) for p in PROMPTS[:4]] + [submit(eng, str(served.model), "hi", settings)]
        for sink in sinks:
            assert sink.done.wait(30)
        assert [s.text for s in sinks[:4]] == expected
    finally:
        eng.scheduler.shutdown(1.0)
    with pytest.raises(LorakitError, match="differently quantized"):
        Engine(str(served.model), [("q", qlora), ("alpha", served.adapters["alpha"])], ServeConfig(), "fp32")


def test_a_request_for_an_unloaded_adapter_ends_with_an_error(engine: Engine) -> None:
    sink = Sink()
    engine.scheduler.submit(Request([5, 6, 7], 999, frozenset(), GenerationSettings(max_new_tokens=4), sink))
    assert sink.done.wait(10)
    assert sink.events[-1].kind == "error" and "unloaded" in sink.events[-1].text

"""The local transformers backend, on a tiny random Llama built in the test (nothing downloaded)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dataprep.rephrase.hf_backend import TransformersBackend, model_fingerprint  # noqa: E402
from dataprep.rephrase.types import Request, Result  # noqa: E402
from tests.support.tiny_llm import SENTENCES, build_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _requests(n: int = 5) -> list[Request]:
    out = []
    for i in range(n):
        doc = " ".join(SENTENCES[: i + 1]) * (1 + i % 2)
        messages = [
            {"role": "system", "content": "Rewrite the text."},
            {"role": "user", "content": doc},
        ]
        out.append(Request(key=f"k{i}", messages=messages, style="qa", source_text=doc))
    return out


def _run(backend: TransformersBackend, requests: list[Request]) -> dict[int, Result]:
    got: dict[int, list[Result]] = {}
    backend.generate(requests, lambda i, r: got.setdefault(i, []).append(r))
    assert sorted(got) == list(range(len(requests)))
    assert all(len(v) == 1 for v in got.values()), "on_result must be called exactly once per index"
    return {i: v[0] for i, v in got.items()}


def _backend(model_dir, **kw) -> TransformersBackend:
    params = {"max_tokens": 8, "temperature": 0, "seed": 1}
    params.update(kw.pop("params", {}))
    return TransformersBackend(model_dir, params=params, device="cpu", **kw)


def test_generates_one_ok_result_per_request(model_dir):
    calls = []
    backend = _backend(model_dir, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert backend.name == "transformers"
    assert backend.model == model_dir.name
    assert not backend.use_chat_template
    requests = _requests()
    results = _run(backend, requests)
    for i, r in results.items():
        assert r.status == "ok", r.reason
        assert isinstance(r.text, str)
        assert 0 < r.tokens_out <= 8
        assert r.tokens_in == len(backend._prompt_ids(requests[i].messages)) > 0
        assert r.attempts == 1 and r.latency_s >= 0
    # different prompt lengths are reported as such
    assert len({r.tokens_in for r in results.values()}) > 1
    assert calls[0] == (0, 5) and calls[-1] == (5, 5)
    assert [d for d, _ in calls] == [0, 2, 4, 5]


def test_same_seed_same_output(model_dir):
    requests = _requests()
    first = _run(_backend(model_dir, batch_size=2), requests)
    second = _run(_backend(model_dir, batch_size=2), requests)
    assert {i: r.text for i, r in first.items()} == {i: r.text for i, r in second.items()}


def test_sampling_is_seeded(model_dir):
    requests = _requests(3)
    sampled = {"temperature": 1.0, "top_p": 0.95, "seed": 7}
    a = _run(_backend(model_dir, batch_size=2, params=sampled), requests)
    b = _run(_backend(model_dir, batch_size=2, params=sampled), requests)
    assert {i: r.text for i, r in a.items()} == {i: r.text for i, r in b.items()}


def test_results_map_back_to_their_index(model_dir):
    # Greedy in fp32 with left padding and an attention mask: a request's output must not
    # depend on which other requests share its batch, so batch sizes 1 and 3 agree per index.
    requests = _requests()
    one = _run(_backend(model_dir, batch_size=1), requests)
    three = _run(_backend(model_dir, batch_size=3), requests)
    for i in range(len(requests)):
        assert one[i].text == three[i].text, i
        assert one[i].tokens_out == three[i].tokens_out
        assert one[i].tokens_in == three[i].tokens_in
    # and a reversed request list gives the same answer for the same request
    rev = _run(_backend(model_dir, batch_size=3), requests[::-1])
    n = len(requests)
    assert all(rev[n - 1 - i].text == one[i].text for i in range(n))


def test_chat_template_is_used(model_dir):
    backend = _backend(model_dir, batch_size=2)
    backend.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    backend.use_chat_template = True
    req = _requests(1)
    ids = backend._prompt_ids(req[0].messages)
    assert backend.tokenizer.decode(ids).endswith("<|assistant|>")
    assert _run(backend, req)[0].status == "ok"


def test_truncation_is_recorded(model_dir):
    backend = _backend(model_dir, batch_size=2, max_input_tokens=12)
    requests = _requests(3)
    full = [len(backend._prompt_ids(r.messages)) for r in requests]
    results = _run(backend, requests)
    for i, r in results.items():
        assert r.status == "ok"
        assert r.tokens_in == min(full[i], 12)
        assert r.extra.get("truncated_input_tokens", 0) == max(0, full[i] - 12)


def test_failed_batch_is_reported_not_raised(model_dir, monkeypatch):
    backend = _backend(model_dir, batch_size=2)

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(backend.hf_model, "generate", boom)
    results = _run(backend, _requests(3))
    for r in results.values():
        assert r.status == "failed"
        assert "RuntimeError" in r.reason and "out of memory" in r.reason

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(backend.hf_model, "generate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        backend.generate(_requests(1), lambda i, r: None)


def test_empty_request_list(model_dir):
    calls = []
    _backend(model_dir).generate([], lambda i, r: calls.append(i))
    assert calls == []


def test_missing_model_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        TransformersBackend(missing, params={})
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        TransformersBackend(missing, params={})
    with pytest.raises(FileNotFoundError, match="no-such-other"):
        model_fingerprint(tmp_path / "no-such-other")


def test_fingerprint_tracks_file_changes(tmp_path):
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "w.bin").write_bytes(b"\0" * (3 << 20))  # more than one 1 MiB block
    base = model_fingerprint(folder)
    assert base == model_fingerprint(folder)
    assert len(base) == 64

    (folder / "sub" / "w.bin").write_bytes(b"\0" * (3 << 20) + b"\1")
    changed = model_fingerprint(folder)
    assert changed != base

    (folder / "sub" / "w.bin").rename(folder / "sub" / "v.bin")  # same content, new name
    assert model_fingerprint(folder) != changed

    (folder / ".cache").mkdir()
    (folder / ".cache" / "meta").write_text("download timestamp")
    assert model_fingerprint(folder) == model_fingerprint(folder)
    before = model_fingerprint(folder)
    (folder / ".cache" / "meta").write_text("another timestamp")
    assert model_fingerprint(folder) == before

"""The app on Ray Serve: a simulated 2-node cluster (``ray.cluster_utils.Cluster``) on this machine, two
replicas on different nodes, concurrent requests through the ``openai`` client, a replica killed by
pid and a node removed while requests run. Slow (a Ray cluster starts in tens of seconds): ``-m slow``."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from moetrt.runtime import Session  # noqa: E402
from tests.serve.conftest import free_port  # noqa: E402

PROMPTS = ["Return the ", "The default value is ", "Create a new ", "The "]
MAX_TOKENS = 24
LONG = 400  # the requests running while a replica or node fails: long enough to be cut mid-stream
MB = 2**20


@pytest.fixture(scope="module")
def cluster(tiny_export):
    from ray import serve
    from ray.cluster_utils import Cluster

    from moetrt.serve.replicas import MODEL_APP, deploy

    # two "nodes" of 1 CPU each, small object stores: the machine is small and shared
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 * MB, "resources": {"head": 1}, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
    ray.init(address=cluster.address, logging_level="ERROR")
    port = free_port()
    try:
        handle = deploy(tiny_export, backend="ort", model_name="tiny", replicas=2, replica_cpus=0.6, max_batch=8,
                        request_timeout=120, port=port, frontend_resources={"head": 0.01})
        yield {"cluster": cluster, "worker": worker, "handle": handle, "url": f"http://127.0.0.1:{port}",
               "app": MODEL_APP}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_export):
    local = Session(tiny_export, backend="ort")
    return {(p, n): local.generate(p, max_new_tokens=n).texts[0] for p in PROMPTS for n in (MAX_TOKENS, LONG)}


def replicas(handle, want: int = 2, tries: int = 60) -> dict[int, str]:
    """pid -> node id of the model replicas, asked until ``want`` distinct ones answered (bounded)."""
    seen: dict[int, str] = {}
    for _ in range(tries):
        pid, node = handle.where.remote().result(timeout_s=60)
        seen[pid] = node
        if len(seen) >= want:
            break
    return seen


def ask_many(url: str, count: int, stream: bool = False, max_tokens: int = MAX_TOKENS, streaming=None) -> list[tuple]:
    """``count`` concurrent completions: ((prompt, max_tokens), text or None, error message or None);
    ``streaming`` (a threading.Event) is set when a first token arrived."""
    def ask(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        key = (prompt, max_tokens)
        with openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120) as c:
            try:
                if stream:
                    chunks = c.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                  stream=True)
                    text = ""
                    for chunk in chunks:
                        text += "".join(choice.text for choice in chunk.choices)
                        if streaming is not None:
                            streaming.set()
                    return key, text, None
                out = c.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)
                return key, out.choices[0].text, None
            except openai.APIError as exc:
                return key, None, str(exc)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(ask, range(count)))


def test_two_replicas_on_two_nodes_answer_20_concurrent_requests(cluster, expected):
    where = replicas(cluster["handle"])
    assert len(where) == 2 and len(set(where.values())) == 2, where
    results = ask_many(cluster["url"], 20)
    assert [error for _, _, error in results] == [None] * 20
    assert all(text == expected[key] for key, text, _ in results)


def check(results, expected) -> None:
    """Each answer is a local Session's; a failure only for a request that had started streaming, saying so."""
    for key, text, error in results:
        if error is None:
            assert text == expected[key]
        else:
            assert "after it had started streaming" in error, error


def run_while(url: str, count: int, action) -> list:
    """``count`` concurrent streamed requests, with ``action()`` done while they run."""
    import threading

    results: list = []
    streaming = threading.Event()
    runner = threading.Thread(target=lambda: results.extend(
        ask_many(url, count, stream=True, max_tokens=LONG, streaming=streaming)))
    runner.start()
    assert streaming.wait(120), "no request streamed a token in 120 s"
    action()
    runner.join(300)
    assert not runner.is_alive(), "requests still running 300 s after the failure"
    return results


def test_a_killed_replica_costs_latency_not_errors(cluster, expected):
    where = replicas(cluster["handle"])
    victim = next(pid for pid, node in where.items() if node == cluster["cluster"].head_node.node_id)
    retried = httpx.get(cluster["url"] + "/health").json()["retried"]
    during = run_while(cluster["url"], 20, lambda: os.kill(victim, signal.SIGKILL))
    after = ask_many(cluster["url"], 20, stream=True)  # sent right after the kill
    print("requests resent after the kill:", httpx.get(cluster["url"] + "/health").json()["retried"] - retried,
          "; failed after streaming:", sum(e is not None for *_, e in during))
    check(during + after, expected)
    assert [error for _, _, error in after] == [None] * 20
    deadline = time.monotonic() + 120
    while len(set(replicas(cluster["handle"])) - {victim}) < 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica in 120 s"
        time.sleep(1)


def test_a_node_removed_while_requests_run(cluster, expected):
    during = run_while(cluster["url"], 20, lambda: cluster["cluster"].remove_node(cluster["worker"]))
    print("failed after streaming:", sum(e is not None for *_, e in during))
    after = ask_many(cluster["url"], 10)  # sent after the node left: all succeed on the replica left
    check(during + after, expected)
    assert [error for _, _, error in after] == [None] * 10

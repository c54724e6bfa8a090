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
    return {p: local.generate(p, max_new_tokens=MAX_TOKENS).texts[0] for p in PROMPTS}


def replicas(handle, want: int = 2, tries: int = 60) -> dict[int, str]:
    """pid -> node id of the model replicas, asked until ``want`` distinct ones answered (bounded)."""
    seen: dict[int, str] = {}
    for _ in range(tries):
        pid, node = handle.where.remote().result(timeout_s=60)
        seen[pid] = node
        if len(seen) >= want:
            break
    return seen


def ask_many(url: str, count: int, stream: bool = False) -> list[tuple[str, str | None]]:
    """``count`` concurrent completions: (prompt, text or None), with the error message for a failure."""
    def ask(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        with openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120) as c:
            try:
                if stream:
                    chunks = c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                  stream=True)
                    return prompt, "".join(ch.choices[0].text for ch in chunks if ch.choices), None
                out = c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
                return prompt, out.choices[0].text, None
            except openai.APIError as exc:
                return prompt, None, str(exc)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(ask, range(count)))


def test_two_replicas_on_two_nodes_answer_20_concurrent_requests(cluster, expected):
    where = replicas(cluster["handle"])
    assert len(where) == 2 and len(set(where.values())) == 2, where
    results = ask_many(cluster["url"], 20)
    assert [error for _, _, error in results] == [None] * 20
    assert all(text == expected[prompt] for prompt, text, _ in results)


def test_a_killed_replica_costs_latency_not_errors(cluster, expected):
    where = replicas(cluster["handle"])
    victim = next(pid for pid, node in where.items() if node == cluster["cluster"].head_node.node_id)
    os.kill(victim, signal.SIGKILL)  # before the requests: every one routed to it has streamed nothing
    results = ask_many(cluster["url"], 20, stream=True)
    assert [error for _, _, error in results] == [None] * 20
    assert all(text == expected[prompt] for prompt, text, _ in results)
    deadline = time.monotonic() + 120
    while victim in replicas(cluster["handle"], tries=10) or len(replicas(cluster["handle"])) < 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica in 120 s"
        time.sleep(1)


def test_a_node_removed_while_requests_run(cluster, expected):
    import threading

    results: list = []
    runner = threading.Thread(target=lambda: results.extend(ask_many(cluster["url"], 20)))
    runner.start()
    time.sleep(0.5)
    cluster["cluster"].remove_node(cluster["worker"])
    runner.join(300)
    assert not runner.is_alive()
    after = ask_many(cluster["url"], 10)  # sent after the node left: all succeed on the replicas left
    for prompt, text, error in results + after:
        if error is None:
            assert text == expected[prompt]
        else:  # only a request that had started streaming on the removed node may fail, and says so
            assert "after it had started streaming" in error, error
    assert [error for _, _, error in after] == [None] * 10

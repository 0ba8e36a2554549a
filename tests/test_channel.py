"""The front's line to the model workers (serving/channel.py), over real Unix sockets."""
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serving import channel
from serving.admission import Overloaded
from training.contract import NUM_CLASSES, random_images


def logits_of(images):
    """A stand-in model whose answer shows which images it saw."""
    return np.repeat(images.reshape(len(images), -1)[:, :1].astype(np.float32), NUM_CLASSES, axis=1)


async def slow_model(images):
    await asyncio.sleep(0.002 * (10 - len(images) % 10))   # answers come back out of order
    return logits_of(images)


def test_concurrent_requests_of_every_size_get_their_own_answers(tmp_path):
    path = str(tmp_path / "m.sock")
    sizes = [1, 7, 2, 300, 1, 64, 5, 1024, 3, 9] * 3

    async def main():
        server = await channel.serve(path, slow_model, max_images=4096)
        front = channel.ModelChannel([path])
        batches = [random_images(n, seed=i) for i, n in enumerate(sizes)]
        answers = await asyncio.gather(*(front(images) for images in batches))
        server.close()
        return batches, answers, front.lines[path]

    batches, answers, line = asyncio.run(main())
    for images, logits in zip(batches, answers):
        assert logits.dtype == np.float32 and logits.shape == (len(images), NUM_CLASSES)
        np.testing.assert_array_equal(logits, logits_of(images))
    assert line.pending == {}   # one connection carried them all, and holds nothing now


def test_a_refusal_and_a_failure_reach_the_front_and_the_worker_goes_on(tmp_path):
    path = str(tmp_path / "m.sock")

    async def model(images):
        if len(images) == 2:
            raise Overloaded("server busy: this request would wait about 3.0 s", 2.2)
        if len(images) == 3:
            raise ValueError("broken backend")
        return logits_of(images)

    async def main():
        server = await channel.serve(path, model, max_images=16)
        front = channel.ModelChannel([path])
        with pytest.raises(Overloaded, match="would wait about 3.0 s") as refused:
            await front(random_images(2))
        with pytest.raises(channel.ModelError, match="ValueError: broken backend"):
            await front(random_images(3))
        images = random_images(4)
        np.testing.assert_array_equal(await front(images), logits_of(images))
        server.close()
        return refused.value

    refusal = asyncio.run(main())
    assert refusal.retry_after == 3 and refusal.status == 503


def test_a_caller_that_goes_away_leaves_nothing_behind(tmp_path):
    path = str(tmp_path / "m.sock")
    release = None

    async def model(images):
        await release.wait()
        return logits_of(images)

    async def main():
        nonlocal release
        release = asyncio.Event()
        server = await channel.serve(path, model, max_images=16)
        front = channel.ModelChannel([path])
        waiting = asyncio.ensure_future(front(random_images(1)))
        await asyncio.sleep(0.05)
        waiting.cancel()
        release.set()
        images = random_images(5)
        answer = await front(images)
        await asyncio.sleep(0.05)   # the cancelled request's late answer has arrived by now
        server.close()
        return answer, front.lines[path].pending

    answer, pending = asyncio.run(main())
    np.testing.assert_array_equal(answer, logits_of(random_images(5)))
    assert pending == {}


WORKER = """
import asyncio, sys
sys.path.insert(0, {repo!r})
from serving import channel
from tests.test_channel import logits_of

async def model(images):
    if images[0, 0, 0, 0] == 255:   # the request that the test's first worker dies under
        await asyncio.sleep(3600)
    return logits_of(images)

async def main():
    await channel.serve({path!r}, model, max_images=16)
    print("listening", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def start_worker(path):
    worker = subprocess.Popen([sys.executable, "-c", WORKER.format(repo=str(Path(__file__).parents[1]), path=path)],
                              stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "listening"
    return worker


def test_a_request_whose_worker_dies_is_sent_again_to_its_successor(tmp_path):
    path = str(tmp_path / "m.sock")
    stuck = random_images(1)
    stuck[0, 0, 0, 0] = 255
    first = start_worker(path)
    successor = None

    async def main():
        nonlocal successor
        front = channel.ModelChannel([path])
        images = random_images(3)
        np.testing.assert_array_equal(await front(images), logits_of(images))
        waiting = asyncio.ensure_future(front(stuck))
        await asyncio.sleep(0.2)
        first.kill()
        first.wait()
        successor = start_worker(path)   # binds the same path, as a restarted BentoML worker does
        with pytest.raises(asyncio.TimeoutError):   # sent again: the successor holds it too (the same input)
            await asyncio.wait_for(asyncio.shield(waiting), 1)
        successor.kill()
        successor.wait()
        start = time.monotonic()
        with pytest.raises(Overloaded, match="no model worker available") as refused:
            await waiting   # its second connection broke too: refused, not retried again
        assert time.monotonic() - start < 5 and refused.value.retry_after == 1
        successor = start_worker(path)
        np.testing.assert_array_equal(await front(images), logits_of(images))   # a new connection

    try:
        asyncio.run(main())
    finally:
        for worker in (first, successor):
            if worker and worker.poll() is None:
                worker.kill()


def test_no_worker_listening_is_a_refusal_with_retry_after(tmp_path, caplog):
    front = channel.ModelChannel([str(tmp_path / "nobody.sock")])
    with pytest.raises(Overloaded, match="^no model worker available; retry later$") as refused:
        asyncio.run(front(random_images(1)))
    assert refused.value.retry_after == 1   # the client hears no socket path; the log says what happened
    assert "cannot reach the model worker at" in caplog.records[-1].getMessage() and "nobody.sock" in caplog.text


def test_requests_spread_over_workers_by_what_each_has_in_flight(tmp_path):
    paths = [str(tmp_path / f"m{i}.sock") for i in (1, 2)]
    seen = {path: 0 for path in paths}

    def model_for(path):
        async def model(images):
            seen[path] += 1
            await asyncio.sleep(0.05)
            return logits_of(images)
        return model

    async def main():
        servers = [await channel.serve(path, model_for(path), max_images=16) for path in paths]
        front = channel.ModelChannel(paths)
        await asyncio.gather(*(front(random_images(1, seed=i)) for i in range(10)))
        for server in servers:
            server.close()

    asyncio.run(main())
    assert seen == {paths[0]: 5, paths[1]: 5}


def test_a_frame_larger_than_the_worker_takes_fails_alone(tmp_path):
    # It used to close the connection, and with it every request in flight on it (503s for innocent clients).
    path = str(tmp_path / "m.sock")

    async def main():
        server = await channel.serve(path, slow_model, max_images=4)
        line = channel.Line(path)
        batches = [random_images(n, seed=n) for n in (1, 2, 3, 4)]
        others = [asyncio.ensure_future(line(images)) for images in batches]
        with pytest.raises(channel.ModelError, match="a frame over the 12288 bytes allowed"):
            await line(random_images(5))
        answers = await asyncio.gather(*others)
        assert not line.broken()   # the same connection carries on
        again = await line(batches[0])
        server.close()
        return batches, answers, again

    batches, answers, again = asyncio.run(main())
    for images, logits in zip(batches, answers):
        np.testing.assert_array_equal(logits, logits_of(images))
    np.testing.assert_array_equal(again, logits_of(batches[0]))


@pytest.mark.parametrize("batch", [np.zeros((0, 32, 32, 3), np.uint8), np.zeros((5, 32, 32, 3), np.uint8),
                                   np.zeros((2, 32, 32, 3), np.float32), np.zeros((2, 3, 32, 32), np.uint8),
                                   np.zeros((2, 32, 32), np.uint8)])
def test_the_front_sends_only_batches_the_workers_take(tmp_path, batch):
    path = str(tmp_path / "m.sock")
    sent = []

    async def model(images):
        sent.append(images)
        return logits_of(images)

    async def main():
        server = await channel.serve(path, model, max_images=4)
        front = channel.ModelChannel([path], max_images=4)
        with pytest.raises(ValueError, match="not a batch for the model workers"):
            await front(batch)
        await front(random_images(4))
        server.close()

    asyncio.run(main())
    assert len(sent) == 1


def test_a_worker_that_cannot_be_reached_is_left_alone_while_another_answers(tmp_path, caplog):
    live, dead = str(tmp_path / "live.sock"), str(tmp_path / "dead.sock")

    async def main():
        server = await channel.serve(live, slow_model, max_images=16)
        front = channel.ModelChannel([dead, live])
        batches = [random_images(1, seed=i) for i in range(20)]
        answers = [await front(images) for images in batches]
        server.close()
        return batches, answers

    batches, answers = asyncio.run(main())
    for images, logits in zip(batches, answers):   # every request answered, by the live worker
        np.testing.assert_array_equal(logits, logits_of(images))
    retries = [r for r in caplog.records if "retrying once" in r.getMessage()]
    assert len(retries) == 1 and "dead.sock" in retries[0].getMessage()   # tried once, then left alone

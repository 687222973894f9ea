"""The sdtune Jupyter kernel, driven by real Jupyter clients (jupyter_client, jupyter_kernel_test).

Run by .ci/run in its venv, after `sdtune kernel install --prefix <venv>`:
    python -m unittest discover -s tests/jupyter -v
"""

import hashlib
import hmac
import json
import os
import queue
import time
import unittest
import uuid
from datetime import datetime, timezone

import jupyter_kernel_test as jkt
import zmq
from jupyter_client.manager import start_new_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny-sd15", "tiny-sd15.safetensors")
TIMEOUT = 60


class SdtuneKernelTests(jkt.KernelTests):
    kernel_name = "sdtune"
    language_name = "rhai"
    file_extension = ".rhai"

    code_hello_world = 'print("hello, world")'
    code_stderr = 'debug("to stderr")'

    completion_samples = [
        {"text": "load_mod", "matches": {"load_model"}},
        {"text": "synth", "matches": {"synthetic_dataset"}},
        {"text": "lora(m, #{ conv_", "matches": {"conv_dim", "conv_alpha", "conv_block_dims", "conv_block_alphas"}},
    ]

    complete_code_samples = ["1", 'print("hi")', "fn f(x) {\n  x * 2\n}", "let m = 1;"]
    incomplete_code_samples = ["fn f(x) {", '"an open string', "let x = [1, 2,"]
    invalid_code_samples = ["let = 7q"]

    code_generate_error = 'throw "boom"'

    code_execute_result = [
        {"code": "1 + 2", "result": "3"},
        {"code": "[1, 2].map(|x| x * x)", "result": "[1, 4]"},
        {"code": "plot([3.0, 2.0, 1.5])", "mime": "image/png"},
    ]

    code_display_data = [
        {"code": "show(plot([3.0, 2.0, 1.5]))", "mime": "image/png"},
        {"code": 'show(tensor([[[0.0]], [[0.5]], [[-1.0]]]))', "mime": "image/png"},
    ]

    code_history_pattern = "1 ?*"
    supported_history_operations = ("tail", "range", "search")

    code_inspect_sample = "load_model"

    def test_variables_persist_and_complete(self):
        self.flush_channels()
        reply, _ = self.execute_helper("let learning_rate_here = 3;")
        self.assertEqual(reply["content"]["status"], "ok")
        reply, out = self.execute_helper("learning_rate_here * 2")
        self.assertEqual([m["content"]["data"]["text/plain"] for m in out if m["msg_type"] == "execute_result"], ["6"])
        self.kc.complete("learning_rate_h")
        reply = self.get_non_kernel_info_reply(timeout=jkt.TIMEOUT)
        self.assertEqual(reply["content"]["matches"], ["learning_rate_here"])
        self.assertEqual(reply["content"]["cursor_start"], 0)

    def test_errors_name_the_cell_and_position(self):
        self.flush_channels()
        reply, out = self.execute_helper("let a = 1;\nlet b = a + nope;")
        self.assertEqual(reply["content"]["status"], "error")
        self.assertEqual(reply["content"]["ename"], "ScriptError")
        self.assertIn("In [", reply["content"]["evalue"])
        self.assertIn(":2:", reply["content"]["evalue"])

    def test_inspect_a_variable(self):
        self.flush_channels()
        self.execute_helper("let xs = [1, 2, 3];")
        self.kc.inspect("xs", 1)
        reply = self.get_non_kernel_info_reply(timeout=jkt.TIMEOUT)
        self.assertTrue(reply["content"]["found"])
        self.assertIn("[1, 2, 3]", reply["content"]["data"]["text/plain"])


def poll(get, accept, timeout, what):
    """Messages from `get` until `accept(msg)` is true; returns all it saw, that one last."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            msg = get(timeout=1)
        except queue.Empty:
            continue
        seen.append(msg)
        if accept(msg):
            return seen
    raise AssertionError(f"{what}; got {[m['msg_type'] for m in seen]}")


def drain_until_idle(kc, msg_id, timeout=TIMEOUT):
    """The IOPub messages of one request, up to its idle status."""
    ours = lambda m: m["parent_header"].get("msg_id") == msg_id
    seen = poll(kc.get_iopub_msg, lambda m: ours(m) and m["msg_type"] == "status"
                and m["content"]["execution_state"] == "idle", timeout, f"no idle status for {msg_id}")
    return [m for m in seen if ours(m)]


def shell_reply(kc, msg_id, timeout=TIMEOUT):
    seen = poll(kc.get_shell_msg, lambda m: m["parent_header"].get("msg_id") == msg_id, timeout,
                f"no reply to {msg_id}")
    return seen[-1]


class ProtocolTests(unittest.TestCase):
    """Signatures, interrupts and shutdown, each with a kernel of its own."""

    def setUp(self):
        self.km, self.kc = start_new_kernel(kernel_name="sdtune", cwd=ROOT)

    def tearDown(self):
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=True)

    def run_cell(self, code, timeout=TIMEOUT):
        msg_id = self.kc.execute(code)
        reply = shell_reply(self.kc, msg_id, timeout)
        return reply, drain_until_idle(self.kc, msg_id, timeout)

    def raw_execute(self, key, code):
        """An execute_request signed with `key`, sent on a socket of our own; returns the socket."""
        info = self.km.get_connection_info()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(f"tcp://{info['ip']}:{info['shell_port']}")
        header = {
            "msg_id": uuid.uuid4().hex, "session": uuid.uuid4().hex, "username": "test",
            "date": datetime.now(timezone.utc).isoformat(), "msg_type": "execute_request", "version": "5.3",
        }
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        parts = [json.dumps(p).encode() for p in (header, {}, {}, content)]
        sig = hmac.new(key, b"".join(parts), hashlib.sha256).hexdigest().encode()
        sock.send_multipart([b"<IDS|MSG>", sig] + parts)
        return sock

    def test_a_message_with_a_bad_signature_is_ignored(self):
        key = self.km.session.key
        bad = self.raw_execute(b"not-the-key", "let hacked = 1; hacked")
        unsigned = self.raw_execute(b"", "let hacked = 2; hacked")
        for sock in (bad, unsigned):
            self.assertEqual(sock.poll(2000), 0, "the kernel answered a message it should have dropped")
        # the same message correctly signed is answered, and the dropped ones did not run
        good = self.raw_execute(key, "1 + 1")
        self.assertEqual(good.poll(10000), zmq.POLLIN)
        reply, _ = self.run_cell("hacked")
        self.assertEqual(reply["content"]["status"], "error")
        for sock in (bad, unsigned, good):
            sock.close(0)

    def test_an_interrupt_stops_a_running_cell_and_the_kernel_keeps_its_state(self):
        self.run_cell("let kept = 41;")
        msg_id = self.kc.execute("let n = 0; loop { n += 1; }")
        time.sleep(1.5)
        self.km.interrupt_kernel()
        reply = shell_reply(self.kc, msg_id, 20)
        self.assertEqual(reply["content"]["status"], "error")
        self.assertEqual(reply["content"]["ename"], "Interrupted")
        reply, out = self.run_cell("kept + 1")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual([m["content"]["data"]["text/plain"] for m in out if m["msg_type"] == "execute_result"], ["42"])

    def test_a_training_shows_live_progress_and_an_interrupt_saves_its_state(self):
        out_dir = os.path.join(ROOT, "target", "tmp", f"kernel-train-{os.getpid()}")
        setup = f"""
let out_dir = "{out_dir}";
let model = load_model("{MODEL}");
let data = synthetic_dataset(out_dir + "/data", #{{ concept: "toy", count: 4, size: 64, repeats: 1 }});
let ds = dataset(data, #{{ resolution: 64, batch_size: 2 }});
let net = lora(model, #{{ dim: 4, alpha: 4.0 }});
"""
        reply, _ = self.run_cell(setup)
        self.assertEqual(reply["content"]["status"], "ok", reply["content"])
        with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
            f.write("toy, a red circle --w 64 --h 64 --s 4 --d 1\n")
        cell = f"""
let run = train(#{{ model: model, network: net, dataset: ds, learning_rate: 1e-3, max_train_steps: 2000,
    output_dir: out_dir, output_name: "live", overwrite: true, sample_prompts: out_dir + "/prompts.txt",
    sample_every_n_steps: 3, sample_sampler: "euler" }});
print("not reached");
"""
        msg_id = self.kc.execute(cell)
        displays, updates = [], []
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and not any("samples:" in u["content"]["data"]["text/plain"] for u in updates):
            try:
                msg = self.kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["msg_type"] == "display_data":
                displays.append(msg)
            elif msg["msg_type"] == "update_display_data":
                updates.append(msg)
        self.km.interrupt_kernel()
        reply = shell_reply(self.kc, msg_id, TIMEOUT)
        rest = drain_until_idle(self.kc, msg_id)
        updates += [m for m in rest if m["msg_type"] == "update_display_data"]
        self.assertEqual(reply["content"]["status"], "error")
        self.assertEqual(reply["content"]["ename"], "Interrupted")
        self.assertFalse(any("not reached" in m["content"].get("text", "") for m in rest if m["msg_type"] == "stream"))
        # one display, updated in place
        self.assertEqual(len(displays), 1)
        display_id = displays[0]["content"]["transient"]["display_id"]
        self.assertTrue(updates and all(u["content"]["transient"]["display_id"] == display_id for u in updates))
        last = updates[-1]["content"]["data"]
        self.assertIn("image/png", last)
        self.assertIn("<progress", last["text/html"])
        self.assertIn("samples:", last["text/plain"])
        self.assertIn("stopped", last["text/plain"])
        # the state is saved and the variables are still there
        self.assertTrue(os.path.isfile(os.path.join(out_dir, "live-state", "state.json")))
        reply, out = self.run_cell("net.modules > 0")
        self.assertEqual([m["content"]["data"]["text/plain"] for m in out if m["msg_type"] == "execute_result"], ["true"])

    def test_a_shutdown_request_ends_the_process_cleanly(self):
        process = self.km.provisioner.process
        msg_id = self.kc.shutdown()
        reply = self.kc.get_control_msg(timeout=10) if hasattr(self.kc, "get_control_msg") else shell_reply(self.kc, msg_id)
        self.assertEqual(reply["header"]["msg_type"], "shutdown_reply")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(process.wait(timeout=10), 0)


if __name__ == "__main__":
    unittest.main()

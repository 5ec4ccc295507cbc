"""A stand-in for Triton on 127.0.0.1 speaking the KServe v2 HTTP protocol (health, model ready/metadata, infer with
the binary-data extension), serving the ONNX models of a repository written by export.triton with onnxruntime.

Only the request/response shape is real here: no Triton server can be installed on these machines.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

_DTYPES = {'UINT8': np.uint8, 'FP32': np.float32}


class KServeStandIn:
    def __init__(self, repository: Path) -> None:
        import onnxruntime as ort

        self.sessions = {d.name: ort.InferenceSession(str(d / '1' / 'model.onnx'), providers=['CPUExecutionProvider'])
                         for d in repository.iterdir() if (d / '1' / 'model.onnx').is_file()}
        self.requests = 0
        self.server = ThreadingHTTPServer(('127.0.0.1', 0), self._handler())
        self.url = f'127.0.0.1:{self.server.server_address[1]}'
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> KServeStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _send(self, code: int, body: dict | None = None, binary: bytes = b'') -> None:
                header = json.dumps(body or {}).encode()
                self.send_response(code)
                self.send_header('Content-Type', 'application/json' if not binary else 'application/octet-stream')
                if binary:
                    self.send_header('Inference-Header-Content-Length', str(len(header)))
                self.send_header('Content-Length', str(len(header) + len(binary)))
                self.end_headers()
                self.wfile.write(header + binary)

            def do_GET(self) -> None:  # noqa: N802
                parts = self.path.strip('/').split('/')
                if parts[:3] == ['v2', 'health', 'ready'] or parts[:3] == ['v2', 'health', 'live']:
                    return self._send(200)
                if len(parts) >= 3 and parts[:2] == ['v2', 'models'] and parts[2] in outer.sessions:
                    if parts[-1] == 'ready':
                        return self._send(200)
                    s = outer.sessions[parts[2]]
                    return self._send(200, {'name': parts[2], 'platform': 'onnxruntime_onnx',
                                            'inputs': [{'name': i.name, 'datatype': 'UINT8', 'shape': [-1, 96, 96, 3]}
                                                       for i in s.get_inputs()],
                                            'outputs': [{'name': o.name, 'datatype': 'FP32', 'shape': [-1, 2]}
                                                        for o in s.get_outputs()]})
                return self._send(400, {'error': f'unknown model or endpoint {self.path}'})

            def do_POST(self) -> None:  # noqa: N802
                parts = self.path.strip('/').split('/')
                if len(parts) != 4 or parts[:2] != ['v2', 'models'] or parts[3] != 'infer' \
                        or parts[2] not in outer.sessions:
                    return self._send(400, {'error': f'unknown model or endpoint {self.path}'})
                body = self.rfile.read(int(self.headers['Content-Length']))
                json_len = int(self.headers.get('Inference-Header-Content-Length', len(body)))
                request, blob = json.loads(body[:json_len]), body[json_len:]
                feeds, offset = {}, 0
                for item in request['inputs']:
                    dtype = _DTYPES[item['datatype']]
                    size = item.get('parameters', {}).get('binary_data_size')
                    if size is not None:
                        data = np.frombuffer(blob[offset:offset + size], dtype=dtype)
                        offset += size
                    else:
                        data = np.asarray(item['data'], dtype=dtype)
                    feeds[item['name']] = data.reshape(item['shape'])
                outer.requests += 1
                session = outer.sessions[parts[2]]
                try:
                    results = session.run(None, feeds)
                except Exception as e:  # the real server answers 400 with the backend's message
                    return self._send(400, {'error': str(e).splitlines()[0]})
                wanted = {o['name']: o.get('parameters', {}).get('binary_data', True)
                          for o in request.get('outputs', [])} or {o.name: True for o in session.get_outputs()}
                outputs, binary = [], b''
                for meta, value in zip(session.get_outputs(), results):
                    if meta.name not in wanted:
                        continue
                    value = np.ascontiguousarray(value, dtype=np.float32)
                    entry = {'name': meta.name, 'datatype': 'FP32', 'shape': list(value.shape)}
                    if wanted[meta.name]:
                        entry['parameters'] = {'binary_data_size': value.nbytes}
                        binary += value.tobytes()
                    else:
                        entry['data'] = value.ravel().tolist()
                    outputs.append(entry)
                self._send(200, {'model_name': parts[2], 'outputs': outputs}, binary)

        return Handler

#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/): a handful of
small valid and near-valid inputs each. Run it again after changing a format the
seeds depend on (the ticket secret in fuzz/src/lib.rs, the protos, the update frame);
it rewrites the seeds it makes and leaves other files alone. Seeds named crash-* are
regressions: inputs of known bugs, which scripts/fuzz runs once each before fuzzing."""

import base64
import hashlib
import hmac
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SECRET = b"ringfeed-fuzz-secret-0123456789!"  # fuzz/src/lib.rs SECRET
FORGER = b"a-forger-s-secret-000000000000000"  # in no signer of the targets
NOW = 1_800_000_000


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- protobuf, by hand -------------------------------------------------------------

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_varint(field, n):
    return varint(field << 3) + varint(n)


def f_bytes(field, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def f_fixed64(field, n):
    return varint(field << 3 | 1) + struct.pack("<Q", n)


def msg(*fields):
    return b"".join(f for f in fields if f)


def ring(version=3, rid="r3"):
    return msg(f_varint(1, version), f_bytes(2, rid))


def update(key, seq, data=None, b64=None, ct=None):
    if b64 is not None:
        return '{"type":"update","key":"%s","seq":%d,"data_b64":"%s","content_type":%s}' % (
            key, seq, base64.b64encode(b64).decode(), json.dumps(ct))
    return '{"type":"update","key":"%s","seq":%d,"data":%s}' % (key, seq, data)


def entry(key, epoch, seq, frame, idem=""):
    return msg(f_bytes(1, key), f_bytes(2, epoch), f_varint(3, seq), f_bytes(4, frame),
               f_bytes(5, idem) if idem else b"")


def idem_record(i, seq, digest=0):
    return msg(f_bytes(1, i), f_varint(2, seq), f_fixed64(3, digest) if digest else b"")


def snapshot(key, epoch, seq, entries=(), window=()):
    return msg(f_bytes(1, key), f_bytes(2, epoch), f_varint(3, seq),
               *[f_bytes(4, e) for e in entries], *[f_bytes(5, r) for r in window])


def publish(key, data, ct="", idem="", ack=0, expected_seq=None, expected_epoch=""):
    return msg(f_bytes(1, key), f_bytes(2, data), f_bytes(3, ct) if ct else b"",
               f_bytes(4, idem) if idem else b"", f_varint(5, ack) if ack else b"",
               f_varint(6, expected_seq) if expected_seq is not None else b"",
               f_bytes(7, expected_epoch) if expected_epoch else b"")


def deliver(items, rid=7, timeout=0):
    return msg(f_bytes(1, ring()), *[f_bytes(2, i) for i in items], f_varint(3, rid),
               f_varint(4, timeout) if timeout else b"")


def replicate(snapshots=(), entries=(), dropped=(), frm="n1"):
    return msg(f_bytes(1, ring()), f_bytes(2, frm), *[f_bytes(3, s) for s in snapshots],
               *[f_bytes(4, e) for e in entries], *[f_bytes(5, d) for d in dropped])


def handoff(snapshots, complete=True, offered=False, frm="n1"):
    return msg(f_bytes(1, ring()), f_bytes(2, frm), *[f_bytes(3, s) for s in snapshots],
               f_varint(4, 1) if complete else b"", f_varint(5, 1) if offered else b"")


def member(i, points=4, state="active"):
    return json.dumps({"id": i, "incarnation": "inc-" + i, "grpc": "http://127.0.0.1:7001",
                       "http": "http://127.0.0.1:8001", "quic": None, "points": points,
                       "state": state, "version": "0.1.0"}, separators=(",", ":"))


# --- client frames -------------------------------------------------------------------

def client_frame():
    t = "client_frame"
    write(t, "ping", '{"type":"ping"}')
    write(t, "publish-object", '{"type":"publish","data":{"x":1},"id":"a1"}')
    # A regression seed (fuzz/README.md): a peer refuses the frame of a `null` publish.
    write(t, "crash-null-data-refused-by-peer", '{"type":"publish","data":null,"id":7}')
    write(t, "publish-array", '{"type":"publish","data":[1,2.5,"s",true,false,null],"id":{"n":[1]}}')
    write(t, "publish-string", '{"type":"publish","data":"caf\\u00e9 \\ud83d\\ude00 [{\\"","id":null}')
    write(t, "publish-spaced", '{ "type" : "publish" ,\r\n "data" : {"a" :\n 1 , "b":[ ]} , "id" : 1.5e-7 }')
    write(t, "publish-numbers", '{"type":"publish","data":[1e400,-0.0,18446744073709551616,-9223372036854775809],"id":-0.0}')
    write(t, "publish-no-data", '{"type":"publish","id":"no-data"}')
    write(t, "unknown-type", '{"type":"subscribe","key":"k"}')
    write(t, "duplicate-type", '{"type":"publish","type":"ping","data":1}')
    write(t, "truncated", '{"type":"publish","data":{"x":1},"id":"a')
    write(t, "not-object", '["ping"]')
    write(t, "deep-ok", '{"type":"publish","data":%s1%s,"id":"d"}' % ("[" * 119, "]" * 119))
    write(t, "deep-refused", '{"type":"publish","data":%s1%s,"id":"d"}' % ("[" * 121, "]" * 121))
    write(t, "deep-in-strings", '{"type":"publish","data":"%s","id":"%s"}' % ("[" * 200, "{" * 10))
    write(t, "type-number", '{"type":1}')


# --- query parameters ----------------------------------------------------------------

def query_params():
    t = "query_params"
    seeds = {
        "full": "key=user%3A1&since=4&epoch=Ab-_9&rv=7&presence=1&wait=0",
        "key-only": "key=user:1",
        "credentials": "key=user%3A1&ticket=v1.abc.def&resume=v1.xyz.uvw",
        "empty": "",
        "since-negative": "since=-1",
        "since-text": "since=x",
        "since-overflow": "since=18446744073709551616",
        "since-max": "key=a+b%20c&since=18446744073709551615&epoch=0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_",
        "epoch-colon": "epoch=a:b",
        "epoch-empty": "epoch=",
        "wait-over": "wait=61",
        "wait-max": "wait=60&presence=true",
        "wait-fraction": "wait=1.5",
        "rv-bad": "rv=z",
        "presence-bad": "presence=maybe",
        "repeated": "presence=true&presence=0&key=a&key=b",
        "bad-escapes": "key=%FF%FE%&since=1%",
        "bare": "&&==&key&since",
        "unknown": "key=k&unknown=1&wait=25",
    }
    for name, q in seeds.items():
        write(t, name, q)


def last_event_id():
    t = "last_event_id"
    seeds = {
        "valid": "E1:42",
        "epoch-ours": "AbCdEfGh-_123456:0",
        "no-colon": "42",
        "seq-text": "E1:x",
        "no-epoch": ":4",
        "seq-max": "E1:18446744073709551615",
        "seq-overflow": "E1:18446744073709551616",
        "seq-plus": "E1:+5",
        "two-colons": "a:b:c",
        "epoch-64": "e" * 64 + ":1",
        "epoch-65": "e" * 65 + ":1",
        "seq-negative": "E1:-1",
        "epoch-unicode": "\u00e9po:1",
    }
    for name, v in seeds.items():
        write(t, name, v)


# --- tickets -------------------------------------------------------------------------

def b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_json(sub, key, exp, publish=False, presence=False, kind="ticket", nonce=""):
    c = {"sub": sub, "key": key, "exp": exp}
    if publish:
        c["publish"] = True
    if presence:
        c["presence"] = True
    c["kind"] = kind
    if nonce:
        c["nonce"] = nonce
    return json.dumps(c, separators=(",", ":"), ensure_ascii=False).encode()


def token(payload, secret=SECRET):
    signed = "v1." + b64u(payload)
    mac = hmac.new(secret, signed.encode(), hashlib.sha256).digest()
    return signed + "." + b64u(mac)


def ticket_verify():
    t = "ticket_verify"
    good = token(claims_json("user-7", "user:42", NOW + 3600, presence=True, nonce="n0Nc3-_x"))
    write(t, "ticket", good)
    write(t, "resume", token(claims_json("user-7", "user:42", NOW + 60, publish=True, kind="resume")))
    write(t, "expired", token(claims_json("user-7", "user:42", NOW)))
    write(t, "other-key", token(claims_json("user-7", "user:43", NOW + 60)))
    write(t, "sub-too-long", token(claims_json("s" * 257, "user:42", NOW + 60)))
    write(t, "extra-fields", token(b'{ "kind":"ticket", "exp":1900000000, "key":"user:42", "sub":"\\u00e9", "x":[1] }'))
    write(t, "not-claims", token(b"[1,2]"))
    write(t, "kind-unknown", token(claims_json("a", "user:42", NOW + 60, kind="admin")))
    write(t, "forged", token(claims_json("user-7", "user:42", NOW + 3600), FORGER))
    write(t, "changed-byte", good[:10] + ("A" if good[10] != "A" else "B") + good[11:])
    write(t, "short-tag", good[:-4])
    write(t, "empty", "")
    write(t, "no-dots", "x")
    write(t, "version-2", "v2" + good[2:])
    write(t, "empty-claims", "v1..AAAA")
    write(t, "too-long", "v1." + "A" * 2046)


def ticket_claims():
    t = "ticket_claims"
    now = str(NOW)
    write(t, "valid", "user-7\nuser:42\n1800003600\nr\n%s\nn0Nc3\n" % now)
    write(t, "resume-publish", "user-7\nuser:42\n1800003600\npR\n%s\n\n" % now)
    write(t, "expired", "user-7\nuser:42\n%s\n\n%s\n\n" % (now, now))
    write(t, "sub-long", "%s\nuser:42\n1800003600\n\n%s\n\n" % ("s" * 300, now))
    write(t, "unicode", "\u00e9\u0001\"\\\nuser:42\n1800003600\nr\n%s\n\u2028\n" % now)
    # Edits: (op, position/256 of the token, byte): set, flip, insert, remove, truncate.
    head = b"user-7\nuser:42\n1800003600\nr\n" + now.encode() + b"\nnonce\n"
    write(t, "edit-flip", head + bytes([1, 128, 4]))
    write(t, "edit-dot", head + bytes([2, 40, ord(".")]))
    write(t, "edit-truncate", head + bytes([4, 250, 0]))
    write(t, "edit-many", b"u\nuser:42\n1800003600\n\n" + now.encode() + b"\n\n" + bytes([0, 3, ord("w"), 3, 9, 0, 2, 255, ord("A")]))
    raw = "user-7\nuser:42\n0\nJ\n%s\n\n" % now
    write(t, "raw-valid", raw + '{"sub":"a","key":"user:42","exp":1900000000,"kind":"ticket"}')
    write(t, "raw-extra", raw + '{"sub":"a","key":"user:42","exp":1900000000,"kind":"resume","presence":true,"x":null}')
    write(t, "raw-nonce", raw + '{"sub":"a","key":"user:42","exp":1900000000,"kind":"ticket","nonce":"abc"}')
    write(t, "raw-duplicate", raw + '{"sub":"a","sub":"b","key":"user:42","exp":1900000000,"kind":"ticket"}')
    write(t, "raw-float-exp", raw + '{"sub":"a","key":"user:42","exp":1.9e9,"kind":"ticket"}')
    write(t, "raw-array", raw + "[1,2]")
    write(t, "raw-empty", raw)


# --- internal messages ---------------------------------------------------------------

def frames_of(key, seqs, data="1"):
    return [update(key, s, data) for s in seqs]


def internal_decode():
    t = "internal_decode"
    e = lambda k, s: entry(k, "E1", s, update(k, s, '{"a":%d}' % s))
    snap = snapshot("user:1", "E1", 2, [e("user:1", 1), e("user:1", 2)], [idem_record("i1", 1, 0x1234)])
    write(t, "deliver", b"\x00" + deliver([publish("user:1", b'{"a":1}', idem="i1", ack=1, expected_seq=0)], timeout=500))
    write(t, "replicate", b"\x01" + replicate([snap], [e("user:2", 1)], ["user:3"]))
    write(t, "handoff", b"\x02" + handoff([snap], offered=True))
    write(t, "key-presence", b"\x03" + msg(f_bytes(1, ring()), f_bytes(2, "user:1")))
    write(t, "status", b"\x04" + msg(f_bytes(1, "n2")))
    write(t, "drain", b"\x05" + msg(f_bytes(1, "n1")))
    write(t, "replicate-reply", b"\x06" + msg(f_bytes(1, "user:1"), f_bytes(1, "user:2"), f_bytes(2, ring())))
    write(t, "handoff-reply", b"\x07" + msg(f_bytes(2, ring(9, "r9"))))
    status = msg(f_bytes(1, "n2"), f_varint(2, 1), f_bytes(3, ring()),
                 f_bytes(4, member("n1")), f_bytes(4, member("n2", 8)), f_bytes(4, member("n3", 2, "draining")),
                 f_bytes(4, member("n1", 16)), f_bytes(4, "not json"))
    write(t, "status-reply", b"\x08" + status)
    result_ok = msg(f_bytes(1, msg(f_varint(1, 5), f_bytes(2, "E1"), f_bytes(3, "n1"), f_varint(4, 2), f_varint(5, 1))))
    result_err = msg(f_bytes(2, msg(f_varint(1, 3), f_bytes(2, "invalid key"))))
    result_moved = msg(f_bytes(3, ring(4, "r4")))
    write(t, "deliver-reply", b"\x09" + msg(f_bytes(1, result_ok), f_bytes(1, result_err), f_bytes(1, result_moved), f_bytes(2, ring()), f_varint(3, 7)))
    write(t, "key-presence-reply", b"\x0a" + msg(f_bytes(1, msg(f_bytes(1, "alice"), f_bytes(1, "bob"), f_bytes(2, "n1")))))
    write(t, "snapshot", b"\x0b" + snap)
    write(t, "unknown-fields", b"\x01" + msg(f_bytes(2, "n1"), f_varint(15, 99), f_bytes(16, "??"), f_fixed64(17, 1)))


def internal_deliver():
    t = "internal_deliver"
    write(t, "one", deliver([publish("user:1", b'{"a":1}')]))
    write(t, "json-values", deliver([publish("user:1", d) for d in
                                     [b"true", b"-0.5e3", b'"s\\u0000"', b"[]", b' {"a" :\r\n[1]} ']]))
    write(t, "crash-null-data-refused-by-peer", deliver([publish("user:1", b"null")]))
    write(t, "binary", deliver([publish("user:1", b"\x00\xff\n\"", ct="application/octet-stream"),
                                publish("user:1", b"plain", ct="text/plain; charset=\"utf-8\"")]))
    write(t, "json-types", deliver([publish("user:1", b"{}", ct="application/vnd.x+json; v=1"),
                                    publish("user:1", b"{nope", ct="APPLICATION/JSON")]))
    write(t, "idempotent", deliver([publish("k", b"1", idem="i1"), publish("k", b"1", idem="i1"),
                                    publish("k", b"2", idem="i1"), publish("k", b"3", idem="i2")]))
    write(t, "expected-seq", deliver([publish("user:2", b"1", expected_seq=0),
                                      publish("user:2", b"2", expected_seq=0),
                                      publish("user:2", b"3", expected_seq=1, expected_epoch="nope")]))
    write(t, "many", deliver([publish("user:3", b"%d" % i, idem="i%d" % (i % 12)) for i in range(14)]))
    write(t, "refusals", deliver([publish("bad key", b"1"), publish("k", b"1", idem="x" * 257),
                                  publish("k", b"[" * 17 + b"]" * 17), publish("k", b"1" * 1025),
                                  publish("k", b"1", ct="t/" + "x" * 254), publish("k", b"\xff")]))
    write(t, "two-keys", deliver([publish("a", b"1"), publish("b", b"2"), publish("a", b"3", idem="i")]))
    write(t, "empty", deliver([]))


def internal_replicate():
    t = "internal_replicate"
    e = lambda k, s, ep="E1", idem="", data=None: entry(k, ep, s, update(k, s, data or '{"n":%d}' % s), idem)
    write(t, "snapshot", replicate([snapshot("user:1", "E1", 2, [e("user:1", 1), e("user:1", 2)],
                                             [idem_record("i1", 1), idem_record("i2", 2, 99)])]))
    write(t, "entries", replicate(entries=[e("user:2", s, idem="i%d" % s) for s in (1, 2, 3)]))
    write(t, "out-of-order", replicate(entries=[e("user:2", s) for s in (3, 1, 2, 2)]))
    write(t, "epoch-change", replicate(entries=[e("k", 1), e("k", 2), e("k", 1, "E2")]))
    write(t, "dropped", replicate([snapshot("user:1", "E1", 1, [e("user:1", 1)])], dropped=["user:1", "user:9"]))
    write(t, "gap", replicate([snapshot("g", "E1", 4, [e("g", 1), e("g", 2), e("g", 4)])]))
    write(t, "trim", replicate(entries=[e("t", s, data='"%s"' % ("x" * 300)) for s in range(1, 9)]))
    write(t, "binary-frame", replicate(entries=[entry("b", "E1", 1, update("b", 1, b64=b"\x00\xff", ct="application/octet-stream"))]))
    write(t, "bad-frames", replicate(entries=[entry("k", "E1", 1, update("k", 2, "1")),
                                               entry("k", "E1", 1, b"\xff"),
                                               entry("k", "no epoch", 1, update("k", 1, "1")),
                                               entry("k", "E1", 1, '{"type":"update","key":"k","seq":1,"data":1,"x":0}')]))
    write(t, "crash-spaced-frame-accepted", replicate(entries=[entry("k", "E1", 1, '{"type": "update", "key": "k", "seq": 1, "data": 1}')]))
    write(t, "high-seq", replicate([snapshot("h", "E1", 2**64 - 2, [e("h", 2**64 - 2)])]))


def internal_handoff():
    t = "internal_handoff"
    e = lambda k, s, data=None, idem="": entry(k, "E1", s, update(k, s, data or "[%d]" % s), idem)
    write(t, "install", handoff([snapshot("user:1", "E1", 3, [e("user:1", s) for s in (1, 2, 3)])]))
    write(t, "install-window", handoff([snapshot("user:1", "E1", 2, [e("user:1", 1), e("user:1", 2)],
                                                 [idem_record("i1", 1), idem_record("i2", 2, 77), idem_record("i3", 9)])]))
    write(t, "no-entries", handoff([snapshot("user:2", "E1", 10)]))
    write(t, "no-history-twice", handoff([snapshot("z", "E1", 0), snapshot("z", "E2", 5)]))
    write(t, "gap", handoff([snapshot("g", "E1", 5, [e("g", 1), e("g", 2), e("g", 5)])]))
    write(t, "trim", handoff([snapshot("t", "E1", 9, [e("t", s, '"%s"' % ("y" * 200)) for s in range(1, 10)])]))
    write(t, "offered", handoff([snapshot("o", "E1", 2, [e("o", 1), e("o", 2)]),
                                 snapshot("o", "E0", 9, [e("o", 9)]),
                                 snapshot("o", "E2", 1, [e("o", 1)])], offered=True))
    write(t, "binary", handoff([snapshot("b", "E1", 1, [entry("b", "", 1, update("b", 1, b64=b"hi", ct="text/plain"))])]))
    write(t, "bad-snapshots", handoff([snapshot("bad key", "E1", 1), snapshot("k", "", 1),
                                       snapshot("k", "E1", 2, [e("k", 2), e("k", 1)]),
                                       snapshot("k", "E1", 1, [entry("j", "E1", 1, update("j", 1, "1"))])]))
    write(t, "spaced-frame", handoff([snapshot("k", "E1", 1, [entry("k", "E1", 1, '{"type":"update","key":"k","seq":1,"data": 1 }')])]))
    write(t, "crash-seq-overflow", handoff([snapshot("h", "E1", 2**64 - 2, [e("h", 2**64 - 2)])]))


def doc_update():
    """y-websocket messages as a stock editor sends them (made with yrs 0.28: Y.Text "t"
    gets "hello", then a deletion; Y.Map "m" gets k=42), and broken ones."""
    t = "doc_update"
    h = bytes.fromhex
    update1 = h("00020f01010100040101740568656c6c6f00")
    update2 = h("000206000101010102")
    write(t, "update", update1)
    write(t, "delete", update2)
    write(t, "step2-map", h("00010e010101052801016d016b017d2a00"))
    write(t, "step1-empty", h("00000100"))
    write(t, "step1-sv", h("000003010106"))
    write(t, "two-out-of-order", update2 + update1)
    write(t, "whole-state", h("0002220104010004010174016881010002840102026c6f2801016d016b017d2a0101010102"))
    write(t, "awareness", h("0119010701157b2275736572223a7b226e616d65223a2261227d7d"))
    write(t, "awareness-query", h("03"))
    write(t, "truncated", update1[:-4])
    write(t, "many-clients-claimed", h("0002") + bytes([0x09, 0xff, 0xff, 0xff, 0x0f, 0x00, 0x00, 0x00, 0x00]))
    write(t, "empty-update", h("00020200"))


if __name__ == "__main__":
    client_frame()
    query_params()
    last_event_id()
    ticket_verify()
    ticket_claims()
    internal_decode()
    internal_deliver()
    internal_replicate()
    internal_handoff()
    doc_update()

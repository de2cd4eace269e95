#!/usr/bin/env python3
"""Times GET /v1/creators/{id}/clusters against a running clusterd (auth off)
and prints the query cache's list lookups from /metrics. Modes: seed (200
messages for each of three creators), list N (N sequential lists, round
robin), mix N (N times: 8 ingests, 2 lists, random creators). Driven by
loadtest/cache_bench.sh; see BENCHMARKS.md, "Query cache"."""
import http.client, json, sys, time, random, re
port = int(sys.argv[1]); mode = sys.argv[2]; n = int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port)
def req(method, path, body=None):
    h = {"content-type": "application/json"} if body is not None else {}
    t = time.perf_counter()
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers=h)
    r = c.getresponse(); data = r.read()
    return r.status, data, time.perf_counter() - t
def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs)-1, int(p/100*len(xs)))]*1000
creators = ["bench-a", "bench-b", "bench-c"]
topics = ["price of the vip ticket", "shipping merch to brazil", "when do doors open", "refund my order", "meet and greet", "parking at the venue", "age limit", "setlist tonight", "camera allowed", "wheelchair access"]
if mode == "seed":
    for cr in creators:
        for i in range(200):
            s, d, _ = req("POST", "/v1/messages", {"creator_id": cr, "text": f"{random.choice(topics)} question {i % 40} for show {i % 7}"})
            assert s == 202, d
    print("seeded"); sys.exit()
lat = []
if mode == "list":
    for i in range(n):
        s, d, t = req("GET", f"/v1/creators/{creators[i % 3]}/clusters?limit=20")
        assert s == 200; lat.append(t)
elif mode == "mix":
    k = 0
    for i in range(n):
        for j in range(8):
            s, d, _ = req("POST", "/v1/messages", {"creator_id": random.choice(creators), "text": f"{random.choice(topics)} mix {k}"}); k += 1
            assert s == 202, d
        for j in range(2):
            s, d, t = req("GET", f"/v1/creators/{random.choice(creators)}/clusters?limit=20")
            assert s == 200; lat.append(t)
s, d, _ = req("GET", "/metrics"); m = d.decode()
hits = sum(float(x) for x in re.findall(r'clusterd_query_cache_total\{result="hit",route="list"\} (\S+)', m))
miss = sum(float(x) for x in re.findall(r'clusterd_query_cache_total\{result="miss",route="list"\} (\S+)', m))
print(f"{mode}: {len(lat)} lists p50 {pct(lat,50):.2f} ms p95 {pct(lat,95):.2f} ms p99 {pct(lat,99):.2f} ms; list lookups so far: hit {hits:.0f} miss {miss:.0f}")

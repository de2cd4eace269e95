-- A long clustering history, loaded by loadtest/decision_bench.sh into a
-- migrated database whose embedding columns are pinned to :dims.
--
-- Per creator (`:'prefix'<c>`, c = 0..:creators-1), :per_creator messages,
-- all `clustered`: the :open_msgs most recent ones spread round-robin over
-- :open_clusters OPEN clusters, the older ones in ACTIONED clusters of
-- :actioned_size members with a response_text. One message per hour
-- backwards from now, interleaved across creators as a real stream is
-- (rows are inserted oldest first; ids are UUIDv7 of the message's time).
--
-- Each cluster is about one of the loadtest's questions (:'questions', one
-- per line; a creator's open clusters are about distinct ones) and its
-- members are small variations of it, so the load's messages find exact and
-- trigram matches in the open clusters and in the history. Embeddings:
-- a random centre per cluster (from a pool of 4,096) plus random noise
-- (from a pool of 1,024; cosine to the centre about 0.9), L2-normalised;
-- a cluster's centroid is the SUM of its members' embeddings, as the
-- daemon keeps it. The creators table gets each creator's last event id
-- (one event per message and per action); the events table stays empty
-- (nothing on the decision path reads it).
\set ON_ERROR_STOP on
SET synchronous_commit = off;
SELECT setseed(0.42) \gset

CREATE TEMP TABLE q AS
SELECT (row_number() OVER () - 1)::int AS i, t AS text FROM string_to_table(:'questions', E'\n') AS t;
SELECT count(*) AS nq FROM q \gset

CREATE TEMP TABLE centre AS
SELECT i, (SELECT array_agg(random() - 0.5) FROM generate_series(1, :dims) WHERE i >= 0)::vector(:dims) AS v
FROM generate_series(0, 4095) AS i;
CREATE TEMP TABLE noise AS
SELECT i, (SELECT array_agg((random() - 0.5) * 0.5) FROM generate_series(1, :dims) WHERE i >= 0)::vector(:dims) AS v
FROM generate_series(0, 1023) AS i;
CREATE UNIQUE INDEX ON centre (i);
CREATE UNIQUE INDEX ON noise (i);

-- Message n of creator c (n = 0 the newest) and its cluster j (j below
-- :open_clusters: open).
CREATE TEMP TABLE layout AS
SELECT c, n,
       CASE WHEN n < :open_msgs THEN n % :open_clusters
            ELSE :open_clusters + (n - :open_msgs) / :actioned_size END AS j
FROM generate_series(0, :creators - 1) AS c, generate_series(0, :per_creator - 1) AS n;

CREATE TEMP TABLE cl AS
SELECT c, j, j >= :open_clusters AS actioned, count(*)::int AS size,
       interval '1 hour' * (min(n) + 1) AS newest, interval '1 hour' * (max(n) + 1) AS oldest,
       (c + j) % :nq AS qi, (c * 131 + j * 17) % 4096 AS ci
FROM layout GROUP BY c, j;
ALTER TABLE cl ADD COLUMN id uuid;
UPDATE cl SET id = uuidv7(-oldest);
CREATE UNIQUE INDEX ON cl (c, j);

-- Member n's cluster, age, text (its cluster's question, varied) and the
-- pool vectors of its embedding.
CREATE TEMP TABLE member AS
SELECT l.c, l.n, cl.id AS cluster_id, interval '1 hour' * (l.n + 1) AS age,
       q.text || (ARRAY['', ' pls', ' thanks!', '??', ' asap'])[1 + (l.n + l.c) % 5] AS text,
       cl.ci, (l.c * 31 + l.n) % 1024 AS ni
FROM layout l JOIN cl USING (c, j) JOIN q ON q.i = cl.qi;

-- The embedding of a member: its cluster's centre plus its noise, unit.
CREATE FUNCTION pg_temp.embedding(ci int, ni int) RETURNS vector LANGUAGE sql STABLE AS
$$ SELECT l2_normalize((SELECT v FROM centre WHERE i = ci) + (SELECT v FROM noise WHERE i = ni)) $$;

\echo clusters...
INSERT INTO clusters (id, creator_id, status, size, core_size, label, centroid, response_text, actioned_at,
                      created_at, updated_at)
SELECT cl.id, :'prefix' || cl.c, CASE WHEN cl.actioned THEN 'actioned' ELSE 'open' END, cl.size, cl.size, q.text,
       s.centroid,
       CASE WHEN cl.actioned THEN 'Thanks for asking! About "' || q.text || '": see the pinned post.' END,
       CASE WHEN cl.actioned THEN now() - cl.newest + interval '10 minutes' END,
       now() - cl.oldest,
       now() - cl.newest + CASE WHEN cl.actioned THEN interval '10 minutes' ELSE interval '0' END
FROM (SELECT cluster_id AS id, sum(pg_temp.embedding(ci, ni)) AS centroid FROM member GROUP BY cluster_id) AS s
JOIN cl USING (id)
JOIN q ON q.i = cl.qi
ORDER BY cl.oldest DESC, cl.c;

\echo messages...
INSERT INTO messages (id, creator_id, external_id, text, norm_key, visitor, sent_at, received_at, status,
                      cluster_id, membership, similarity, embedding)
SELECT uuidv7(-m.age), :'prefix' || m.c, 'h-' || m.n, m.text,
       sha256(convert_to(lower(regexp_replace(btrim(m.text), '\s+', ' ', 'g')), 'UTF8')),
       jsonb_build_object('id', 'v' || (m.n * 7 + m.c) % 10000), now() - m.age, now() - m.age, 'clustered',
       m.cluster_id, 'core', 0.9, pg_temp.embedding(m.ci, m.ni)
FROM (SELECT * FROM member ORDER BY n DESC, c) AS m;

INSERT INTO creators (creator_id, last_event_id, background_sum, background_count)
SELECT :'prefix' || c, :per_creator + count(*) FILTER (WHERE actioned), NULL, 0 FROM cl GROUP BY c;
-- Each creator's background: the sum of its messages' embeddings.
UPDATE creators r SET background_sum = b.total, background_count = b.n
FROM (SELECT creator_id, sum(embedding) AS total, count(*) AS n FROM messages GROUP BY creator_id) AS b
WHERE b.creator_id = r.creator_id;

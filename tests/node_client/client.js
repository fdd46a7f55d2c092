// A model service written in Node, talking to the mlsidecar agent over the published contract.
//
//   node client.js <port> [host]
//
// Loads proto/mlsidecar/v1/ingest.proto at run time (no generated code), sends a columnar
// PredictionBatch, re-sends it (same batch_id: acknowledged as a duplicate), sends an
// OutcomeBatch and an invalid batch, asks for the model's health, and prints one JSON object.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
const MODEL = "node-client";
const ROWS = 5;

function loadIngest() {
  const definition = protoLoader.loadSync("mlsidecar/v1/ingest.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the .proto (snake_case)
    longs: String, // int64 nanoseconds do not fit a JS number exactly
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).mlsidecar.v1.Ingest;
}

function call(client, method, request) {
  return new Promise((resolve) => {
    client[method](request, { deadline: Date.now() + 10000 }, (error, response) => {
      if (error) {
        resolve({ error: { code: error.code, details: error.details } });
      } else if (method === "GetModelHealth") {
        resolve(response);
      } else {
        resolve({ ...response, accepted: Number(response.accepted) }); // uint64, small
      }
    });
  });
}

function predictionBatch() {
  const ids = [];
  const amount = [];
  const merchant = [];
  const scores = [];
  const latencies = [];
  const traceIds = [];
  const spanIds = [];
  for (let i = 0; i < ROWS; i++) {
    ids.push(`node-${i}`);
    amount.push(10.5 * (i + 1));
    merchant.push(i % 2 === 0 ? "grocery" : "travel");
    scores.push(0.1 + 0.2 * i);
    latencies.push(3 + i);
    traceIds.push(Buffer.alloc(16, i + 1)); // 16 bytes, non-zero
    spanIds.push(Buffer.alloc(8, i + 1)); // 8 bytes
  }
  amount[ROWS - 1] = NaN; // a missing value: accepted, counted as data quality
  return {
    model: MODEL,
    model_version: "v1",
    ids,
    features: [
      { name: "amount", numbers: { values: amount } },
      { name: "merchant", categories: { values: merchant } },
    ],
    scores,
    labels: scores.map((s) => (s >= 0.5 ? "fraud" : "ok")),
    latencies_ms: latencies,
    trace_ids: traceIds,
    span_ids: spanIds,
    attributes: { region: "eu" },
    sample_rate: 0.5,
    batch_id: "node-batch-1",
  };
}

async function main() {
  const port = process.argv[2];
  const host = process.argv[3] || "127.0.0.1";
  if (!port) {
    console.error("usage: node client.js <port> [host]");
    process.exit(2);
  }
  const Ingest = loadIngest();
  const client = new Ingest(`${host}:${port}`, grpc.credentials.createInsecure());
  const batch = predictionBatch();
  const result = {};
  result.predictions = await call(client, "SubmitPredictions", batch);
  result.duplicate = await call(client, "SubmitPredictions", batch);
  result.outcomes = await call(client, "SubmitOutcomes", {
    model: MODEL,
    model_version: "v1",
    ids: batch.ids.slice(0, 3),
    actual_labels: ["ok", "fraud", "ok"],
    batch_id: "node-outcomes-1",
  });
  result.invalid = await call(client, "SubmitPredictions", {
    model: MODEL,
    ids: ["a", "b"],
    scores: [0.5],
  });
  const health = await call(client, "GetModelHealth", { model: MODEL });
  result.health = health.error
    ? health
    : {
        report: protoStructToJson(health.report),
        window_start_unix_nano: health.window_start_unix_nano,
        window_end_unix_nano: health.window_end_unix_nano,
      };
  client.close();
  process.stdout.write(JSON.stringify(result) + "\n");
}

// google.protobuf.Struct as decoded by proto-loader -> plain JSON.
function protoStructToJson(struct) {
  const out = {};
  for (const [key, value] of Object.entries(struct.fields || {})) {
    out[key] = protoValueToJson(value);
  }
  return out;
}

function protoValueToJson(value) {
  switch (value.kind) {
    case "nullValue":
      return null;
    case "numberValue":
      return value.numberValue;
    case "stringValue":
      return value.stringValue;
    case "boolValue":
      return value.boolValue;
    case "structValue":
      return protoStructToJson(value.structValue);
    case "listValue":
      return (value.listValue.values || []).map(protoValueToJson);
    default:
      return null;
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});

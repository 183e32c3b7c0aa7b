#!/usr/bin/env node
// Send records to a Forward server with the npm fluent-logger client, for fluentforward's interop tests.
//
// Usage: node send.js HOST PORT TAG RECORDS.json [OPTIONS_JSON]
//
// RECORDS.json is a JSON array of {"record": {...}, "label"?: "x", "time"?: T}. The event's tag is
// TAG, or TAG.label when a label is given. T is Unix seconds (an integer, sent as a msgpack int) or
// {"epoch": s, "nano": ns} (sent as EventTime); without it the client stamps the current second.
// Anywhere inside a record, {"$base64": "..."} becomes a Buffer, which msgpack packs as bin.
//
// OPTIONS_JSON is passed to FluentSender as its options (eventMode, requireAckResponse, security,
// tls, tlsOptions, ...), plus:
//   timeoutMs            overall deadline (default 20000); also the ack timeout unless one is given.
//   tlsOptions.caFile    a PEM file read into tlsOptions.ca.
//
// Exit status: 0 once every record was written (and, with requireAckResponse, acked) and the socket
// closed; 1 with the error on stderr otherwise (connection error, wrong ack, handshake failure,
// timeout). stdout stays empty; the client's own chatter goes to stderr.
'use strict';

const fs = require('fs');
const path = require('path');

function fail(message) {
  process.stderr.write(`send.js: ${message}\n`);
  process.exit(1);
}

let FluentLogger;
try {
  FluentLogger = require(path.join(__dirname, 'node_modules', 'fluent-logger'));
} catch (err) {
  fail(`cannot load fluent-logger (run \`make node\`): ${err.message}`);
}

const [host, portText, tag, recordsFile, optionsText] = process.argv.slice(2);
if (!host || !portText || !tag || !recordsFile) {
  fail('usage: node send.js HOST PORT TAG RECORDS.json [OPTIONS_JSON]');
}
const options = optionsText ? JSON.parse(optionsText) : {};
const timeoutMs = options.timeoutMs || 20000;
delete options.timeoutMs;

// Turn {"$base64": "..."} into Buffers so records can carry msgpack bin values.
function revive(value) {
  if (Array.isArray(value)) {
    return value.map(revive);
  }
  if (value !== null && typeof value === 'object') {
    const keys = Object.keys(value);
    if (keys.length === 1 && keys[0] === '$base64') {
      return Buffer.from(value.$base64, 'base64');
    }
    const out = {};
    for (const key of keys) {
      out[key] = revive(value[key]);
    }
    return out;
  }
  return value;
}

function eventTime(time) {
  if (time === undefined || time === null) {
    return undefined;
  }
  if (typeof time === 'number') {
    return time;
  }
  return new FluentLogger.EventTime(time.epoch, time.nano);
}

const events = JSON.parse(fs.readFileSync(recordsFile, 'utf8'));
if (options.tlsOptions && options.tlsOptions.caFile) {
  options.tlsOptions.ca = fs.readFileSync(options.tlsOptions.caFile);
  delete options.tlsOptions.caFile;
}

let sender;
try {
  sender = FluentLogger.createFluentSender(tag, {
    host: host,
    port: Number(portText),
    // A failed connection must end the run, not be retried ten minutes later.
    enableReconnect: false,
    ackResponseTimeout: timeoutMs,
    internalLogger: { info: () => {}, error: (...args) => console.error(...args) },
    ...options,
  });
} catch (err) {
  fail(`bad options: ${err.message}`);
}
sender.on('error', (err) => fail(`client error: ${err && (err.stack || err.message || err)}`));

let done = 0;
let finished = false;
setTimeout(() => fail(`timed out after ${timeoutMs} ms with ${done}/${events.length} records done`), timeoutMs)
  .unref();
// The event loop can drain without every callback having run (the server closed the connection):
// that is a failure, not a success.
process.on('exit', (code) => {
  if (code === 0 && !finished) {
    process.stderr.write(`send.js: exited with ${done}/${events.length} records done\n`);
    process.exitCode = 1;
  }
});

function finish() {
  finished = true;
  const socket = sender._socket;
  sender.end();
  if (socket) {
    socket.on('close', () => process.exit(0));
  } else {
    process.exit(0);
  }
}

if (events.length === 0) {
  finish();
}
function acknowledged(err) {
  if (err) {
    fail(`record ${done}: ${err.stack || err.message || err}`);
  }
  done += 1;
  if (done === events.length) {
    finish();
  }
}

for (const event of events) {
  // emit() tells its optional arguments apart by type and position: an absent label or time must be
  // left out, not passed as undefined, or the callback is taken for the time and never called.
  const args = [];
  if (event.label) {
    args.push(event.label);
  }
  args.push(revive(event.record));
  const time = eventTime(event.time);
  if (time !== undefined) {
    args.push(time);
  }
  args.push(acknowledged);
  sender.emit(...args);
}

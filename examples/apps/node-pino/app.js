'use strict';
// Log JSON lines with pino and put the active OpenTelemetry span's ids on each line.
//
// pino's mixin() runs for every log call, so no call site has to pass the ids. The field names are the
// ones @opentelemetry/instrumentation-pino injects (trace_id, span_id, trace_flags); with that
// instrumentation loaded the mixin is not needed. fluentforward reads the fields from the record Fluent
// Bit forwards and ships them to Loki as structured metadata.
//
//   npm install pino @opentelemetry/api @opentelemetry/sdk-trace-node && node app.js

const { trace, isSpanContextValid } = require('@opentelemetry/api');
const { NodeTracerProvider } = require('@opentelemetry/sdk-trace-node');
const pino = require('pino');

// register() also installs the async context manager that startActiveSpan relies on. Add a span
// processor with an OTLP exporter to send the spans to Tempo; ids are generated either way.
new NodeTracerProvider().register();
const tracer = trace.getTracer('shop-orders');

const logger = pino({
  messageKey: 'message',
  mixin() {
    const span = trace.getActiveSpan();
    if (!span || !isSpanContextValid(span.spanContext())) {
      return {}; // outside a span: no (all-zero) ids
    }
    const { traceId, spanId, traceFlags } = span.spanContext();
    return { trace_id: traceId, span_id: spanId, trace_flags: traceFlags.toString(16).padStart(2, '0') };
  },
});

function processOrder(orderId) {
  tracer.startActiveSpan('process_order', (span) => {
    try {
      logger.info({ order_id: orderId }, 'processing order');
      logger.info({ order_id: orderId }, 'order processed');
    } finally {
      span.end();
    }
  });
}

processOrder('o-1001');
logger.info('outside any request');

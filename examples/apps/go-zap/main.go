// Command go-zap logs JSON lines with zap and puts the OpenTelemetry trace context on each line,
// the way the article's example does: trace_id and span_id as W3C lowercase hex fields.
//
// fluentforward reads these fields (and many other spellings) from the record Fluent Bit forwards and
// ships them to Loki as structured metadata, so nothing else in the pipeline needs to know about them.
//
//	go mod init example.com/go-zap && go mod tidy && go run .
package main

import (
	"context"

	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
)

// traceFields returns the trace context of ctx as zap fields, or none outside a valid span: an
// all-zero id is not a trace id, and writing it would only produce noise.
func traceFields(ctx context.Context) []zap.Field {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		return nil
	}
	return []zap.Field{
		zap.String("trace_id", sc.TraceID().String()),
		zap.String("span_id", sc.SpanID().String()),
		zap.String("trace_flags", sc.TraceFlags().String()),
	}
}

func processOrder(ctx context.Context, logger *zap.Logger, orderID string) {
	ctx, span := otel.Tracer("shop/orders").Start(ctx, "process_order")
	defer span.End()

	log := logger.With(traceFields(ctx)...)
	log.Info("processing order", zap.String("order_id", orderID), zap.String("operation", "process_order"))
	// Business logic here; every line logged through `log` carries the trace context.
	log.Info("order processed", zap.String("order_id", orderID))
}

func main() {
	// Add an OTLP exporter (go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc) with
	// sdktrace.WithBatcher to send the spans to Tempo; ids are generated either way.
	tp := sdktrace.NewTracerProvider()
	defer func() { _ = tp.Shutdown(context.Background()) }()
	otel.SetTracerProvider(tp)

	logger, err := zap.NewProduction() // JSON lines, one per event, on stderr
	if err != nil {
		panic(err)
	}
	defer func() { _ = logger.Sync() }()

	processOrder(context.Background(), logger, "o-1001")
	logger.Info("outside any request") // no trace fields: fluentforward sends no trace_id
}

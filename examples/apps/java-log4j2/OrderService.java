import io.opentelemetry.api.GlobalOpenTelemetry;
import io.opentelemetry.api.trace.Span;
import io.opentelemetry.api.trace.SpanContext;
import io.opentelemetry.api.trace.Tracer;
import io.opentelemetry.context.Scope;
import java.util.Map;
import org.apache.logging.log4j.CloseableThreadContext;
import org.apache.logging.log4j.LogManager;
import org.apache.logging.log4j.Logger;

/**
 * Logs with the trace context in the log4j2 ThreadContext (MDC): log4j2.xml's JsonTemplateLayout writes
 * trace_id and span_id as top-level JSON fields, which fluentforward reads and ships to Loki as
 * structured metadata.
 *
 * <p>With the OpenTelemetry Java agent the MDC already holds trace_id, span_id and trace_flags (its
 * log4j context-data instrumentation); the explicit put below is for applications without the agent.
 */
public class OrderService {
    private static final Logger logger = LogManager.getLogger(OrderService.class);
    private static final Tracer tracer = GlobalOpenTelemetry.getTracer("shop-orders");

    public void processOrder(String orderId) {
        Span span = tracer.spanBuilder("process_order").startSpan();
        try (Scope scope = span.makeCurrent();
             CloseableThreadContext.Instance ctc = withTraceContext(span.getSpanContext())) {
            logger.info("Processing order: {}", orderId);
            // Business logic here; every line logged on this thread carries the trace context.
            logger.info("Order processed: {}", orderId);
        } finally {
            span.end();
        }
        // The MDC entries were removed when the try block closed: this line has no trace id.
        logger.info("Order {} done", orderId);
    }

    /** Puts the ids in the MDC for the try block; an invalid (all-zero) context puts nothing. */
    private static CloseableThreadContext.Instance withTraceContext(SpanContext context) {
        if (!context.isValid()) {
            return CloseableThreadContext.putAll(Map.of());
        }
        return CloseableThreadContext.put("trace_id", context.getTraceId())
                .put("span_id", context.getSpanId())
                .put("trace_flags", context.getTraceFlags().asHex());
    }

    public static void main(String[] args) {
        new OrderService().processOrder("o-1001");
    }
}

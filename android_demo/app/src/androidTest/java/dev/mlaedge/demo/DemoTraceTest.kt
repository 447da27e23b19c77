// On a device (./gradlew connectedStandardDebugAndroidTest), with the demo export pushed: the Kotlin engine and the
// tokenizer graphs reproduce the Python reference's greedy trace of the demo model token for token.
package dev.mlaedge.demo

import ai.onnxruntime.OrtEnvironment
import androidx.test.platform.app.InstrumentationRegistry
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Test
import java.io.File

class DemoTraceTest {
    @Test
    fun greedyTraceEqualsPython() {
        val ctx = InstrumentationRegistry.getInstrumentation().targetContext
        val trace = JSONObject(ctx.assets.open("static_protocol.json").bufferedReader().readText()).getJSONObject("demo_trace")
        val manifest = ExportManifest.read(File(ctx.getExternalFilesDir(null), "export"))
        val env = OrtEnvironment.getEnvironment()
        TextCodec(env, manifest).use { codec ->
            val ids = codec.encode(trace.getString("prompt"))
            val want = trace.getJSONArray("prompt_ids").let { a -> IntArray(a.length()) { a.getInt(it) } }
            assertArrayEquals(want, ids)
            StaticEngine(env, manifest, "fp32", Provider.CPU).use { engine ->
                var logits = engine.prefill(ids)
                val got = IntArray(32) { _ -> logits.indices.maxByOrNull { logits[it] }!!.also { logits = engine.decode(it) } }
                val greedy = trace.getJSONArray("greedy_ids").let { a -> IntArray(a.length()) { a.getInt(it) } }
                assertArrayEquals(greedy, got)
            }
        }
    }
}

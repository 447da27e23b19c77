// The Kotlin engine against the Python runtime, call by call. tests/test_android.py runs mla_edge.runtime's static
// session and generator on two exports (the demo model and a tiny transformers checkpoint) for two prompts each (one
// crossing a prefill-chunk boundary, one that fills the buffer to the last slot), records every graph call's feeds and
// outputs and every detokenizer call, and points this test at them (-Dmlaedge.traces=DIR). The engine here runs the
// same prompts over a GraphRunner that fails on any feed that differs (ids and positions exactly, floats within 1e-6)
// and answers with Python's recorded outputs; the tokens, text and finish reason must be Python's.
package dev.mlaedge.demo

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertThrows
import org.junit.Assert.assertTrue
import org.junit.Assume.assumeTrue
import org.junit.Test
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.channels.FileChannel
import java.nio.file.StandardOpenOption

/** A recorded trace: trace.json (calls, prompts, detokenizer answers) over trace.bin (little-endian tensor data). */
class Trace(val dir: File) {
    val json = JSONObject(File(dir, "trace.json").readText())
    private val blob: ByteBuffer = FileChannel.open(File(dir, "trace.bin").toPath(), StandardOpenOption.READ).use {
        it.map(FileChannel.MapMode.READ_ONLY, 0, it.size()).order(ByteOrder.LITTLE_ENDIAN)
    }

    fun float(t: JSONObject, i: Int): Float = blob.getFloat(t.getLong("offset").toInt() + 4 * i)
    fun int(t: JSONObject, i: Int): Int = blob.getInt(t.getLong("offset").toInt() + 4 * i)
}

fun JSONArray.ints() = IntArray(length()) { getInt(it) }
fun JSONArray.longs() = LongArray(length()) { getLong(it) }

/** Checks each call's feeds against Python's and writes Python's outputs into the engine's output buffers. */
class ReplayRunner(private val trace: Trace) : GraphRunner {
    private val calls = trace.json.getJSONArray("calls")
    private val bound = HashMap<String, Pair<List<HostTensor>, List<HostTensor>>>()
    var next = 0
        private set
    val total get() = calls.length()

    override fun bind(graph: String, inputs: List<HostTensor>, outputs: List<HostTensor>) {
        bound[graph] = inputs to outputs
    }

    override fun run(graph: String) {
        val n = next++
        assertTrue("call $n: Kotlin ran $graph after Python's last call", n < calls.length())
        val call = calls.getJSONObject(n)
        assertEquals("call $n: graph", call.getString("graph"), graph)
        val (inputs, outputs) = bound.getValue(graph)
        val feeds = call.getJSONArray("feeds")
        assertEquals("call $n: feed names", (0 until feeds.length()).map { feeds.getJSONObject(it).getString("name") }, inputs.map { it.name })
        for ((i, t) in inputs.withIndex()) check(n, graph, t, feeds.getJSONObject(i))
        val outs = call.getJSONArray("outputs")
        assertEquals("call $n: output names", (0 until outs.length()).map { outs.getJSONObject(it).getString("name") }, outputs.map { it.name })
        for ((i, t) in outputs.withIndex()) {
            val o = outs.getJSONObject(i)
            assertArrayEquals("call $n: ${t.name} shape", o.getJSONArray("shape").longs(), t.shape)
            for (j in 0 until t.elements) t.floats.put(j, trace.float(o, j))
        }
    }

    private fun check(n: Int, graph: String, t: HostTensor, want: JSONObject) {
        val where = "call $n ($graph): feed ${t.name}"
        assertEquals("$where dtype", want.getString("dtype"), t.dtype)
        assertArrayEquals("$where shape", want.getJSONArray("shape").longs(), t.shape)
        for (j in 0 until t.elements) {
            if (t.dtype == "int32") {
                val (got, py) = t.ints.get(j) to trace.int(want, j)
                if (got != py) throw AssertionError("$where[$j] is $got, Python fed $py")
            } else {
                val (got, py) = t.floats.get(j) to trace.float(want, j)
                if (!(Math.abs(got - py) <= 1e-6f)) throw AssertionError("$where[$j] is $got, Python fed $py")
            }
        }
    }

    override fun close() {}
}

/** Python's detokenizer answers, in the order TextStream asked for them. */
class ReplayDetokenizer(trace: Trace) : Detokenizer {
    private val calls = trace.json.getJSONArray("detokenizer")
    private var next = 0

    override fun decode(ids: IntArray): String {
        val n = next++
        assertTrue("detokenizer call $n: Python made only ${calls.length()}", n < calls.length())
        val c = calls.getJSONObject(n)
        assertArrayEquals("detokenizer call $n: ids", c.getJSONArray("ids").ints(), ids)
        return c.getString("text")
    }

    fun finished() = next == calls.length()
}

class ReplayTest {
    private fun traces(): List<File> {
        val dir = System.getProperty("mlaedge.traces")
        assumeTrue("no -Dmlaedge.traces=DIR: pytest tests/test_android.py records the traces and runs this test", dir != null)
        return File(dir!!).listFiles()!!.filter { File(it, "trace.json").isFile }.sortedBy { it.name }
    }

    private fun replay(dir: File) {
        val trace = Trace(dir)
        val manifest = ExportManifest.read(dir)
        val runner = ReplayRunner(trace)
        val detok = ReplayDetokenizer(trace)
        StaticEngine(manifest, "fp32", runner).use { engine ->
            val prompts = trace.json.getJSONArray("prompts")
            for (p in 0 until prompts.length()) {
                val want = prompts.getJSONObject(p)
                val eos = if (want.getBoolean("eos")) manifest.eos else emptySet()
                val r = generate(engine, want.getJSONArray("ids").ints(), want.getInt("max_new_tokens"), eos, detok)
                val name = "${dir.name} prompt $p"
                assertArrayEquals("$name: tokens", want.getJSONArray("tokens").ints(), r.tokens)
                assertEquals("$name: text", want.getString("text"), r.text)
                assertEquals("$name: finish", want.getString("finish"), r.finish)
                if (want.getBoolean("fill_last_slot")) { // one more decode fills the last slot; then the buffer is full
                    engine.decode(r.tokens.last())
                    assertEquals("$name: length", engine.capacity, engine.length)
                    val e = assertThrows(CapacityException::class.java) { engine.decode(0) }
                    assertEquals("the static cache holds ${engine.capacity} tokens and is full", e.message)
                }
            }
            val resumes = trace.json.getJSONArray("resumes") // a second prefill on top of decoded tokens
            for (p in 0 until resumes.length()) {
                val want = resumes.getJSONObject(p)
                engine.reset()
                var logits = engine.prefill(want.getJSONArray("first").ints())
                val tokens = ArrayList<Int>()
                repeat(want.getInt("decodes")) { tokens.add(logits.argmax()); logits = engine.decode(tokens.last()) }
                tokens.add(engine.prefill(want.getJSONArray("then").ints()).argmax())
                assertArrayEquals("${dir.name} resume $p: tokens", want.getJSONArray("tokens").ints(), tokens.toIntArray())
                assertEquals("${dir.name} resume $p: length", want.getInt("length"), engine.length)
            }
        }
        assertEquals("${dir.name}: graph calls", runner.total, runner.next)
        assertTrue("${dir.name}: every detokenizer call made", detok.finished())
    }

    @Test
    fun demoModelReplaysPython() = replay(traces().single { it.name == "demo" })

    @Test
    fun tinyCheckpointReplaysPython() = replay(traces().single { it.name == "tiny" })
}

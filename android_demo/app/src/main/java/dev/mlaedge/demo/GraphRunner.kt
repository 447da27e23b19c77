// The one narrow interface between the engine and onnxruntime: "run this graph over these named tensors". The engine
// (StaticEngine.kt) owns every tensor as a direct, native-order buffer allocated once; a runner binds them once and
// runs. OrtGraphRunner.kt implements it with onnxruntime's Android API; the JVM tests replay Python's recorded calls.
package dev.mlaedge.demo

import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.FloatBuffer
import java.nio.IntBuffer

/** One tensor the host owns: a direct buffer in the platform's byte order, allocated once and reused by every call. */
class HostTensor(val name: String, val shape: LongArray, val dtype: String) {
    val elements: Int = shape.fold(1L) { a, b -> a * b }.let {
        require(it in 0..Int.MAX_VALUE / 4) { "tensor $name has ${shape.toList()} elements: too many for one buffer" }
        it.toInt()
    }

    init {
        require(dtype == "float32" || dtype == "int32") {
            "tensor $name is $dtype; this engine holds float32 and int32 tensors (export with --cache-dtype fp32)"
        }
    }

    val bytes: ByteBuffer = ByteBuffer.allocateDirect(elements * 4).order(ByteOrder.nativeOrder())
    val floats: FloatBuffer = bytes.asFloatBuffer()
    val ints: IntBuffer = bytes.asIntBuffer()
}

interface GraphRunner : AutoCloseable {
    /** Once per graph, before its first run: the tensors the engine writes (in the graph's input order) and reads
     *  (in its output order). The same buffers stay bound for the runner's life. */
    fun bind(graph: String, inputs: List<HostTensor>, outputs: List<HostTensor>)

    /** One call of the graph over its bound tensors; the outputs are in their buffers when it returns. */
    fun run(graph: String)

    /** The engine no longer runs this graph (it moved to another capacity): what the runner holds for it may go. */
    fun release(graph: String) {}
}

// The mla-edge Android demo: runs an export folder's static protocol (mla_edge.json) with onnxruntime's own
// Android packages. Two flavors, because onnxruntime-android and onnxruntime-android-qnn are alternative builds of
// the same library: "standard" (CPU, XNNPACK, NNAPI) and "qnn" (adds Qualcomm's HTP NPU; arm64 Snapdragon phones).
plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

val ortVersion = "1.22.0"

android {
    namespace = "dev.mlaedge.demo"
    compileSdk = 34

    defaultConfig {
        applicationId = "dev.mlaedge.demo"
        minSdk = 27 // NNAPI 1.1
        targetSdk = 34
        versionCode = 1
        versionName = "0.2.0"
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
        testInstrumentationRunner = "androidx.test.runner.AndroidJUnitRunner"
    }
    sourceSets["androidTest"].assets.srcDir("src/test/resources") // the golden trace, on the device too

    flavorDimensions += "runtime"
    productFlavors {
        create("standard") { dimension = "runtime" }
        create("qnn") {
            dimension = "runtime"
            applicationIdSuffix = ".qnn"
            ndk { abiFilters.clear(); abiFilters += "arm64-v8a" }
        }
    }

    buildTypes {
        release { isMinifyEnabled = false }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    packaging { jniLibs { useLegacyPackaging = true } } // QNN loads libQnnHtp*.so from the app's lib folder
}

dependencies {
    "standardImplementation"("com.microsoft.onnxruntime:onnxruntime-android:$ortVersion")
    "qnnImplementation"("com.microsoft.onnxruntime:onnxruntime-android-qnn:$ortVersion")
    implementation("com.microsoft.onnxruntime:onnxruntime-extensions-android:0.13.0") // tokenizer graphs
    testImplementation("junit:junit:4.13.2")
    testImplementation("org.json:json:20240303") // Android's org.json, for JVM unit tests
    androidTestImplementation("androidx.test:runner:1.6.2")
    androidTestImplementation("androidx.test.ext:junit:1.2.1")
}

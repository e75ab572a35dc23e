# kennel-trainer. Three layers, so most tests build without LibTorch:
#   kennel_trainer_core   data sets, feature cache, rules, jobs, metrics,
#                         batch loading, the gRPC service
#   kennel_trainer_torch  head training, backbones, fine-tuning, export
#   kennel-trainer        the gRPC edge and main
add_library(kennel_trainer_core STATIC
  ${CMAKE_CURRENT_LIST_DIR}/dataset.cc
  ${CMAKE_CURRENT_LIST_DIR}/feature_cache.cc
  ${CMAKE_CURRENT_LIST_DIR}/rules.cc
  ${CMAKE_CURRENT_LIST_DIR}/job_manager.cc
  ${CMAKE_CURRENT_LIST_DIR}/batch_loader.cc
  ${CMAKE_CURRENT_LIST_DIR}/profiler.cc
  ${CMAKE_CURRENT_LIST_DIR}/trainer_metrics.cc
  ${CMAKE_CURRENT_LIST_DIR}/registry_publisher.cc
  ${CMAKE_CURRENT_LIST_DIR}/trainer_service.cc)
target_include_directories(kennel_trainer_core PUBLIC ${PROJECT_SOURCE_DIR})
target_compile_options(kennel_trainer_core PRIVATE ${KENNEL_WARNINGS})
target_link_libraries(kennel_trainer_core PUBLIC
  kennel_common kennel_sha256 kennel_image kennel_registry_client kennel_storage)

kennel_test(trainer_core_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/dataset_test.cc
          ${CMAKE_CURRENT_LIST_DIR}/feature_cache_test.cc
          ${CMAKE_CURRENT_LIST_DIR}/rules_test.cc
          ${CMAKE_CURRENT_LIST_DIR}/job_manager_test.cc
  LIBS kennel_trainer_core)

add_library(kennel_trainer_torch STATIC
  ${CMAKE_CURRENT_LIST_DIR}/head_trainer.cc
  ${CMAKE_CURRENT_LIST_DIR}/torch_model.cc
  ${CMAKE_CURRENT_LIST_DIR}/finetune.cc
  ${CMAKE_CURRENT_LIST_DIR}/train_job.cc)
target_compile_options(kennel_trainer_torch PRIVATE ${KENNEL_WARNINGS})
target_link_libraries(kennel_trainer_torch PUBLIC kennel_trainer_core
  ${TORCH_LIBRARIES})

kennel_test(head_trainer_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/head_trainer_test.cc
  LIBS kennel_trainer_torch)

add_executable(kennel-trainer ${CMAKE_CURRENT_LIST_DIR}/main.cc)
target_compile_options(kennel-trainer PRIVATE ${KENNEL_WARNINGS})
target_link_libraries(kennel-trainer PRIVATE kennel_trainer_torch)

# Exports cached features, initial weights and batch order for the parity
# test (tests/integration/test_head_parity.py).
add_executable(kennel-head-trace ${CMAKE_CURRENT_LIST_DIR}/head_trace_main.cc)
target_compile_options(kennel-head-trace PRIVATE ${KENNEL_WARNINGS})
target_link_libraries(kennel-head-trace PRIVATE kennel_trainer_torch)
